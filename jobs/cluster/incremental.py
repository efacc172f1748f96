"""Near-duplicate groups without recomputing every image: the state a cluster run leaves for the next.

Every run writes its **dup state** ``artifacts/clusters/dups-<run_id>/`` (:func:`save_state`): the
seqs it grouped (in its row order), their descriptors (float32), the projection (PCA ``A``, ``b``)
and the graph's edges (row pairs and similarity). The run's ``job_runs`` metrics name it
(``dup_state``) and the previous state is removed once the run has committed.

The next run is **incremental** (:func:`plan`) when that state is readable, was made for the same
features key, ``sim``, PCA dimension and thumbnail size, every seq in it still has features, and
the images without a descriptor are at most :data:`MAX_NEW_FRACTION` of the lake. It then reads
only the new images' vectors and thumbnails, projects them with the state's projection, compares
each new image and its flip exactly with every image (:func:`jobs.cluster.dups.edges_of_new`), and
takes the connected components of the old edges plus the new ones. Pairs of two old images cannot
change (their descriptors are the stored ones), so with an exact full run (up to
:data:`jobs.cluster.dups.EXACT_MAX` images) the groups are those of a full run over the same
descriptors; above it the new pairs are exact where the full run's kNN graph is approximate. The
projection is refitted only by a full run (``imagelake cluster --full``, or a run that cannot be
incremental).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np

from jobs.cluster.topics import Projection
from lake.artifacts import read_arrays, write_arrays
from lake.catalog import Lake
from lake.errors import CorruptArtifact
from lake.vectors import embedded_seqs

__all__ = ["DupState", "plan", "save_state", "remove_state", "state_dir", "MAX_NEW_FRACTION"]

log = logging.getLogger("imagelake.jobs.cluster")

#: An incremental run handles at most this share of new images; more and a full run is cheaper.
MAX_NEW_FRACTION = 0.2


@dataclass
class DupState:
    seqs: np.ndarray        # int64 (n,), the state's row order
    image_ids: list[str]    # aligned with seqs
    desc: np.ndarray        # float32 (n, D)
    projection: Projection
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]
    meta: dict


@dataclass
class Plan:
    state: DupState
    new_seqs: np.ndarray    # sorted; images with features and no descriptor in the state
    all_seqs: np.ndarray    # state.seqs then new_seqs
    all_ids: list[str]


def state_dir(lake: Lake, run_id: str) -> str:
    return lake.artifacts_dir("clusters", f"dups-{run_id}")


def state_meta(model: str, sim: float, pca_dim: int, thumbnail_size: int) -> dict:
    return {"kind": "dup-state", "model": model, "sim": float(sim), "pca_dim": int(pca_dim),
            "thumbnail_size": int(thumbnail_size)}


def save_state(lake: Lake, run_id: str, seqs: np.ndarray, desc: np.ndarray, projection: Projection,
               edges: tuple[np.ndarray, np.ndarray, np.ndarray], meta: dict) -> None:
    i, j, s = edges
    write_arrays(state_dir(lake, run_id), {
        "seqs": np.asarray(seqs, np.int64), "desc": np.asarray(desc, np.float32),
        "pca_A": projection.A, "pca_b": projection.b,
        "edge_i": np.asarray(i, np.int64), "edge_j": np.asarray(j, np.int64), "edge_s": np.asarray(s, np.float32),
    }, dict(meta, n=int(len(seqs))))


def remove_state(lake: Lake, run_id: str | None) -> None:
    """Remove an older run's dup state (a local folder, or every object under its prefix)."""
    if not run_id:
        return
    if lake.is_local:
        shutil.rmtree(state_dir(lake, run_id), ignore_errors=True)
    else:
        from lake.staging import remove_staging

        remove_staging(state_dir(lake, run_id))


def plan(lake: Lake, state_run: str | None, meta: dict) -> Plan | None:
    """The incremental plan from the dup state of run ``state_run``, or None (a full run is needed:
    why is logged)."""
    if not state_run:
        return None
    folder = state_dir(lake, state_run)
    if lake.is_local and not os.path.isdir(folder):
        return None
    try:
        art = read_arrays(folder)
    except (CorruptArtifact, OSError, ValueError) as e:
        log.warning("dup state %s unusable (%s); a full run", state_run, e)
        return None
    if any(art.meta.get(k) != v for k, v in meta.items()):
        log.info("dup state %s was made with %s, this run has %s: a full run", state_run,
                 {k: art.meta.get(k) for k in meta}, meta)
        return None
    seqs, ids = embedded_seqs(lake, meta["model"])
    old = art.arrays["seqs"]
    known = np.isin(old, seqs)
    if not known.all():
        log.info("%d images of dup state %s have no features now: a full run", int((~known).sum()), state_run)
        return None
    new_mask = ~np.isin(seqs, old)
    if new_mask.sum() > MAX_NEW_FRACTION * len(seqs):
        return None
    id_of = dict(zip(seqs.tolist(), ids))
    new_seqs = seqs[new_mask]
    state = DupState(old, [id_of[int(q)] for q in old], art.arrays["desc"],
                     Projection(art.arrays["pca_A"], art.arrays["pca_b"]),
                     (art.arrays["edge_i"], art.arrays["edge_j"], art.arrays["edge_s"]), art.meta)
    all_seqs = np.concatenate([old, new_seqs])
    return Plan(state, new_seqs, all_seqs, state.image_ids + [id_of[int(q)] for q in new_seqs])
