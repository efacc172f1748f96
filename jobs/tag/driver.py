"""``imagelake tag``: concept tags for new images, and the learned model retrained and applied.

Runs on the driver: the work is a pass over ``features`` (top-50 concepts and embeddings) with
NumPy and naive Bayes, which is linear in n and light (1M × 64 floats after PCA); Spark would add
a shuffle of the embeddings for no gain.

* Concept tags (source ``concept``): for every image without concept rows for the features model,
  the cumulative-probability cut (:func:`jobs.tag.concepts.concept_tags`).
* Learned tags (source ``learned``): a new model version fitted from every current user tag plus
  ``extra_labels`` (the hook for bucket memberships: (image_id, label) pairs), then applied to
  every image; tags with posterior >= ``tag_min_score`` are written (at most 3 per image).
"""

from __future__ import annotations

from typing import Any, Iterable

import duckdb
import numpy as np
import pyarrow as pa

from jobs.runs import job_run
from jobs.tag.concepts import concept_tags
from jobs.tag.model import ModelStore, TagModel
from jobs.tag.state import user_labels
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, ensure_tables, now_utc, open_table
from lake.migrate import upgrade_table
from lake.settings import Settings
from lake.vectors import default_model_key, load_embeddings

__all__ = ["run_tag", "train_model"]


def _pending_concepts(lake: Lake, model: str) -> pa.Table:
    features, tags = open_table(lake, "features"), open_table(lake, "tags")
    con = duckdb.connect()
    try:
        con.register("features", features.to_pyarrow_dataset())
        anti = ""
        if tags.file_uris():
            con.register("tags", tags.to_pyarrow_dataset())
            anti = ("AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.source = 'concept' AND t.model = $m "
                    "AND t.image_id = f.image_id)")
        return con.sql(f"SELECT image_id, concept_ids, concept_probs FROM features f WHERE model = $m {anti} "
                       "ORDER BY image_id", params={"m": model}).to_arrow_table()
    finally:
        con.close()


def train_model(lake: Lake, settings: Settings, model: str,
                extra_labels: Iterable[tuple[str, str]] | None = None, store: ModelStore | None = None) -> TagModel | None:
    """Fit a new model version from all current user tags plus ``extra_labels`` and make it current.

    Returns ``None`` (nothing saved) when there are no labels for embedded images.
    """
    store = store or ModelStore(lake)
    labels = user_labels(lake) + list(extra_labels or [])
    emb = load_embeddings(lake, model)
    where = {image_id: i for i, image_id in enumerate(emb.image_ids)}
    pairs = [(where[i], tag) for i, tag in labels if i in where]
    if not pairs:
        return None
    with store.locked():
        fitted = TagModel.empty(model, emb.vectors, settings.tag_pca_dim)
        rows = np.array([p[0] for p in pairs])
        fitted.learn(emb.vectors[rows], [p[1] for p in pairs])
        store.save(fitted)
    return fitted


def bucket_labels(lake: Lake) -> list[tuple[str, str]]:
    """(image_id, bucket name) for every member of every live user bucket."""
    from lake.buckets import bucket_state

    state = bucket_state(lake)
    return [(image_id, b["name"]) for b in state.listing() if not b.get("system")
            for image_id in state.member_ids(b["bucket_id"], pending=False)]


def run_tag(lake: Lake, settings: Settings, *, model: str | None = None,
            extra_labels: Iterable[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Concept tags for images that lack them, then retrain and apply the learned-tag model.

    The learned model trains on user tags plus ``extra_labels``; by default those are the members
    of every live bucket, labelled with the bucket's name (a curator's buckets are tags too).

    Raises:
        NotFound: no features yet (run ``imagelake embed``).
    """
    lake.ensure()
    ensure_tables(lake, ["features", "images", "tags", "job_runs"])
    upgrade_table(lake, "tags")
    model = model or default_model_key(lake)
    with job_run(lake, "tag", {"model": model}, settings=settings) as run:
        at = now_utc()
        pending = _pending_concepts(lake, model)
        rows: list[dict] = []
        for image_id, ids, probs in zip(pending.column("image_id").to_pylist(), pending.column("concept_ids").to_pylist(),
                                        pending.column("concept_probs").to_pylist()):
            for tag, p in concept_tags(ids, probs, settings.tag_cum_prob, settings.tag_max_concepts):
                rows.append(dict(image_id=image_id, tag=tag, source="concept", score=p, model=model,
                                 run_id=run.run_id, created_at=at, action="add"))
        tables = [pa.Table.from_pylist(rows, schema=TABLES["tags"].schema)] if rows else []
        if extra_labels is None:
            extra_labels = bucket_labels(lake)
        fitted = train_model(lake, settings, model, extra_labels)
        n_learned = 0
        if fitted is not None:
            emb = load_embeddings(lake, model)
            ids, tags, scores = [], [], []
            for start in range(0, len(emb), 65536):
                for image_id, preds in zip(emb.image_ids[start:start + 65536],
                                           fitted.predict(emb.vectors[start:start + 65536], top=3)):
                    for tag, p in preds:
                        if p >= settings.tag_min_score:
                            ids.append(image_id), tags.append(tag), scores.append(p)
            n_learned = len(ids)
            if ids:
                n = len(ids)
                tables.append(pa.table({
                    "image_id": ids, "tag": tags, "source": ["learned"] * n, "score": pa.array(scores, pa.float32()),
                    "model": [f"gnb-v{fitted.version}"] * n, "run_id": [run.run_id] * n,
                    "created_at": pa.array([at] * n, TABLES["tags"].schema.field("created_at").type),
                    "action": ["add"] * n, "actor": pa.array([None] * n, pa.string())}).cast(TABLES["tags"].schema))
        committed = commit_rows(lake, "tags", pa.concat_tables(tables), run_id=run.run_id) if tables else None
        run.rows_in, run.rows_out = pending.num_rows, committed.rows if committed else 0
        summary = dict(run_id=run.run_id, model=model, concept_images=pending.num_rows, concept_tags=len(rows),
                       learned_model=fitted.version if fitted else None,
                       learned_classes=len(fitted.classes) if fitted else 0, learned_tags=n_learned)
        run.metrics.update({k: v for k, v in summary.items() if k != "run_id"})
    summary["seconds"] = run.metrics["seconds"]
    return summary
