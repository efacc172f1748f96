"""User tag edits (the API's POST /images/<id>/tags): append rows, then update the shared model.

An edit is ``add`` (tags to give), ``remove`` (tags to take away, whatever their source) and
``correct`` (pairs from → to: remove then add). It is appended to ``tags`` as user rows with
action add/remove, the actor and a run id of its own (``edit-<uuid>``), and then folded into the
learned model online under the model lock: an added tag is learned from the image's embedding,
a removed *user* tag is unlearned. Taking away a model's tag only hides it for that image (naive
Bayes has no negative examples). If the model update fails after the rows were committed, the next
``imagelake tag`` retrains from all user rows, so no correction is lost.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from jobs.tag.model import ModelStore, TagModel
from jobs.tag.state import current_tags
from lake.catalog import Lake
from lake.commit import commit_rows, ensure_tables, now_utc
from lake.errors import BadInput, NotFound
from lake.migrate import upgrade_table
from lake.settings import Settings
from lake.vectors import default_model_key, load_embeddings

__all__ = ["TagEdit", "parse_edit", "apply_edit", "normalize_tag"]

_TAG = re.compile(r"[\w][\w .:'&/+-]{0,63}", re.UNICODE)


def normalize_tag(tag: Any) -> str:
    """A tag as stored: trimmed, single-spaced, lower case, 1..64 characters.

    Raises:
        BadInput: not a string, empty, too long or with odd characters.
    """
    if not isinstance(tag, str):
        raise BadInput(f"a tag must be a string, got {tag!r}")
    text = " ".join(tag.split()).lower()
    if not _TAG.fullmatch(text):
        raise BadInput(f"bad tag {tag!r}: use 1 to 64 letters, digits, spaces or . : ' & / + - _")
    return text


@dataclass(frozen=True)
class TagEdit:
    add: tuple[str, ...]
    remove: tuple[str, ...]


def parse_edit(body: Any) -> TagEdit:
    """``{"add": [...], "remove": [...], "correct": [{"from": a, "to": b}]}`` → :class:`TagEdit`.

    Raises:
        BadInput: not an object, unknown keys, wrong types, or nothing to do.
    """
    if not isinstance(body, dict):
        raise BadInput('send a JSON object like {"add": ["cat"], "remove": ["dog"], "correct": [{"from": "dog", "to": "cat"}]}')
    unknown = set(body) - {"add", "remove", "correct"}
    if unknown:
        raise BadInput(f"unknown keys {sorted(unknown)}; use add, remove and correct")
    lists = {}
    for key in ("add", "remove", "correct"):
        value = body.get(key, [])
        if not isinstance(value, list) or len(value) > 100:
            raise BadInput(f"{key} must be a list of at most 100 items")
        lists[key] = value
    add = [normalize_tag(t) for t in lists["add"]]
    remove = [normalize_tag(t) for t in lists["remove"]]
    for pair in lists["correct"]:
        if not isinstance(pair, dict) or set(pair) != {"from", "to"}:
            raise BadInput('each correction must be {"from": "old tag", "to": "new tag"}')
        remove.append(normalize_tag(pair["from"]))
        add.append(normalize_tag(pair["to"]))
    both = set(add) & set(remove)
    if both:
        raise BadInput(f"tags both added and removed: {sorted(both)}")
    if not add and not remove:
        raise BadInput("nothing to do: give add, remove or correct")
    return TagEdit(tuple(dict.fromkeys(add)), tuple(dict.fromkeys(remove)))


def apply_edit(lake: Lake, settings: Settings, image_id: str, edit: TagEdit, actor: str | None,
               store: ModelStore | None = None) -> dict[str, Any]:
    """Append the edit's rows and update the learned model.

    Returns:
        ``added``/``removed`` (what changed), ``model_version`` (after the update; None without a
        model), ``learned`` (whether the model was updated).
    Raises:
        NotFound: the image is not in the lake.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", image_id):
        raise BadInput(f"malformed image id {image_id[:80]!r}: expected 64 lowercase hex characters")
    ensure_tables(lake, ["tags", "images", "features"])
    upgrade_table(lake, "tags")
    store = store or ModelStore(lake)
    model_key = _features_model(lake)
    emb = load_embeddings(lake, model_key, where=f"i.image_id = '{image_id}'") if model_key else None
    if emb is None or len(emb) == 0:
        _check_image(lake, image_id)
    now = _current_user_tags(lake, image_id)
    added = [t for t in edit.add if t not in now]
    removed = list(edit.remove)
    run_id = f"edit-{uuid.uuid4().hex}"
    at = now_utc()
    rows = [dict(image_id=image_id, tag=t, source="user", score=1.0, run_id=run_id, created_at=at,
                 action="add", actor=actor) for t in added]
    rows += [dict(image_id=image_id, tag=t, source="user", score=None, run_id=run_id, created_at=at,
                  action="remove", actor=actor) for t in removed]
    commit_rows(lake, "tags", rows, run_id=run_id)
    learned, version = False, None
    unlearn = [t for t in removed if t in now]
    if emb is not None and len(emb) and (added or unlearn):
        with store.locked():
            model = current_or_new_model(store, lake, emb.model, settings)
            if unlearn:
                model.unlearn(emb.vectors.repeat(len(unlearn), axis=0), unlearn)
            if added:
                model.learn(emb.vectors.repeat(len(added), axis=0), added)
            version = store.save(model)
            learned = True
    elif store.current_version():
        version = store.current_version()
    return {"added": added, "removed": removed, "model_version": version, "learned": learned}


def _features_model(lake: Lake) -> str | None:
    try:
        return default_model_key(lake)
    except NotFound:
        return None


def _current_user_tags(lake: Lake, image_id: str) -> set[str]:
    t = current_tags(lake, image_id)
    return {tag for tag, src in zip(t.column("tag").to_pylist(), t.column("source").to_pylist()) if src == "user"}


def _check_image(lake: Lake, image_id: str) -> None:
    import duckdb

    from lake.commit import open_table

    images = open_table(lake, "images")
    found = False
    if images.file_uris():
        con = duckdb.connect()
        try:
            con.register("images", images.to_pyarrow_dataset())
            found = bool(con.sql("SELECT 1 FROM images WHERE image_id = $id LIMIT 1", params={"id": image_id}).fetchall())
        finally:
            con.close()
    if not found:
        raise NotFound(f"no image {image_id} in the lake; ids are sha256 of the image bytes")


def current_or_new_model(store, lake, features_model: str, settings):
    """The stored tag model when it was learned on ``features_model``, else an empty one fitted
    (PCA) on a sample of that model's embeddings. Call under ``store.locked()``."""
    model = store.fresh()
    if model is None or model.features_model != features_model:
        sample = load_embeddings(lake, features_model, limit=20_000)
        model = TagModel.empty(features_model, sample.vectors, settings.tag_pca_dim)
    return model
