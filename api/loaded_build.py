"""A published index build as one process holds it: verified, memory-mapped, ready to search.

:func:`load_build` checks every file of an ``index_builds`` row against its manifest
(:func:`jobs.index.build.verified_manifests`: size, sha256, the manifest's own hash, the FAISS
version; on an object-store lake through the node's artifact cache) and memory-maps the shards,
the coarse quantizer and each segment's ``seqs``/``ids``/``vectors`` arrays.
:class:`api.index_service.SearchService` serves queries over the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jobs.index.build import Manifest, verified_manifests
from lake.catalog import Lake
from lake.errors import CorruptArtifact
from lake.settings import Settings

__all__ = ["Hit", "LoadedBuild", "load_build"]


@dataclass(frozen=True)
class Hit:
    seq: int
    image_id: str
    score: float


@dataclass
class _Segment:
    """One build folder's rows: seqs (ascending), raw image ids, unit float16 vectors (all mmapped)."""

    seqs: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray
    id_prefix: np.ndarray = field(init=False)
    id_order: np.ndarray = field(init=False)

    def __post_init__(self):
        prefix = np.ascontiguousarray(self.ids[:, :8]).view(">u8").ravel().astype(np.uint64)
        self.id_order = np.argsort(prefix, kind="stable")
        self.id_prefix = prefix[self.id_order]

    def rows_of(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self.seqs, seqs)
        pos = np.minimum(pos, max(0, len(self.seqs) - 1))
        found = (self.seqs[pos] == seqs) if len(self.seqs) else np.zeros(len(seqs), bool)
        return pos, found

    def row_of_id(self, digest: bytes) -> int | None:
        key = np.uint64(int.from_bytes(digest[:8], "big"))
        lo, hi = np.searchsorted(self.id_prefix, key, "left"), np.searchsorted(self.id_prefix, key, "right")
        for row in self.id_order[lo:hi]:
            if self.ids[row].tobytes() == digest:
                return int(row)
        return None


@dataclass
class LoadedBuild:
    """A verified, loaded build: the published row, its manifests, segments and shard indexes."""

    build_id: str
    row: dict[str, Any]
    manifests: list[Manifest]
    segments: list[_Segment]
    shards: list[Any]          # FAISS indexes, kept alive here (the IVF views below borrow them)
    ivfs: list[Any]            # the IVF part of each shard, or None for Flat shards
    coarse: Any                # the base build's trained index (quantizer + transform), or None
    nprobe: int
    loaded_at: float

    @property
    def model(self) -> str:
        return self.row["model"]

    @property
    def d(self) -> int:
        return int(self.row["d"])

    @property
    def ntotal(self) -> int:
        return int(self.row["ntotal"])

    @property
    def factory(self) -> str:
        return self.row["factory"]


def _read_index(path: str):
    import faiss

    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    try:
        return faiss.read_index(path, flag if flag is not None else faiss.IO_FLAG_MMAP)
    except RuntimeError:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP)
        except RuntimeError:
            return faiss.read_index(path)


def load_build(lake: Lake, row: dict[str, Any], settings: Settings) -> LoadedBuild:
    """Verify then load the build of ``row`` (an ``index_builds`` row).

    Raises:
        CorruptArtifact: a file is missing, truncated, altered, or written by a newer FAISS.
    """
    import faiss

    manifests = verified_manifests(lake, row, settings)
    try:
        segments, shards, ivfs = [], [], []
        for m in manifests:
            # plain ndarray views of the maps: np.memmap's Python-level __getitem__ costs ~20 us a call
            segments.append(_Segment(*(np.asarray(np.load(m.path(name), mmap_mode="r"))
                                       for name in ("seqs.npy", "ids.npy", "vectors.npy"))))
            for s in m["shards"]:
                shard = _read_index(m.path(s["file"]))
                shards.append(shard)
                ivfs.append(faiss.try_extract_index_ivf(shard))
        coarse = _read_index(manifests[0].path("trained.faiss")) if ivfs and ivfs[0] is not None else None
    except (RuntimeError, ValueError, OSError) as e:
        raise CorruptArtifact(f"index build {row['build_id']} could not be loaded: {e}") from None
    plan_nprobe = int((manifests[-1].get("plan") or {}).get("nprobe") or 16)
    nprobe = settings.search_nprobe or plan_nprobe
    for ivf in ivfs:
        if ivf is not None:
            nprobe = min(nprobe, ivf.nlist)
            ivf.nprobe = nprobe
    if coarse is not None:
        faiss.extract_index_ivf(coarse).nprobe = nprobe
    return LoadedBuild(row["build_id"], row, manifests, segments, shards, ivfs, coarse, nprobe, time.time())
