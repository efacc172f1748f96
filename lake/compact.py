"""The compact scoring matrix for suggestions: PCA-k of the L2-normalised embeddings, 8-bit scalar
quantised (k bytes per image), as a memory-mappable FAISS ``IndexScalarQuantizer``.

Why this representation (measured in tests/bench/bench_suggest.py): a bucket's linear model is a
direction in the embedding space, and scoring a collection is one inner-product scan. The full
float32 1280-d matrix costs 5 KB per image (5 GB at 1M, out of RAM on small boxes, ~0.3-0.5 s a
scan); PCA-128 keeps the directions a linear model uses, and FAISS's SQ8 scan reads 128 bytes per
image with SIMD and keeps the top-k in the same pass (no 1M-element argpartition).

One build per (model, features table version): ``artifacts/suggest/<model>/v<version>-pca<k>/``
holding ``index.faiss`` (the codes), ``image_ids.bin`` (row i's image id as 32 raw bytes,
memory-mapped too), ``pca.npz`` (mean, components) and ``manifest.json`` (sha256 of each file) written
last, atomically. Every server process memory-maps the same files (``IO_FLAG_MMAP_IFC``), so N
workers share one copy through the page cache. Readers verify sizes and sha256 before loading and
refuse a build that does not match (:class:`lake.errors.CorruptArtifact`).

On an object-store lake the build is made in a local temporary folder and its files are placed into
the same keys of the store, the manifest last; a server fetches verified copies of the files into
its node's artifact cache (:mod:`lake.artifact_cache`) and maps those.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from lake.artifacts import file_sha256
from lake.catalog import Lake
from lake.errors import CorruptArtifact, NotFound
from lake.lock import LakeLock

__all__ = ["CompactMatrix", "ImageIdTable", "build_compact", "compact_dir", "ensure_compact", "fit_pca", "load_compact"]

FORMAT = 1


class ImageIdTable:
    """Row ↔ image id over the build's ``image_ids.bin`` (32 raw bytes per row, memory-mapped).

    A Python list and dict of a million hex ids would cost ~200 MB in every server process; this
    keeps 48 bytes per row (the mapped ids plus a sorted 64-bit key per row for lookups: the xor
    of the id's four 64-bit words, so ids that share a prefix still spread out).
    """

    def __init__(self, path: str):
        self.raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 32)
        prefix = _fold(self.raw)
        self._order = np.argsort(prefix, kind="stable")
        self._sorted = prefix[self._order]

    def __len__(self) -> int:
        return len(self.raw)

    def image_id(self, row: int) -> str:
        return self.raw[int(row)].tobytes().hex()

    def rows_of(self, image_ids) -> np.ndarray:
        """Sorted unique rows of the ``image_ids`` that are in the build (others are skipped)."""
        ids = [i for i in image_ids if len(i) == 64]
        if not ids or len(self._sorted) == 0:
            return np.zeros(0, np.int64)
        want = np.frombuffer(bytes.fromhex("".join(ids)), np.uint8).reshape(-1, 32)
        prefix = _fold(want)
        by_prefix = np.argsort(prefix)
        want, prefix = want[by_prefix], prefix[by_prefix]  # sorted probes: cache-friendly search
        n = len(self._sorted)
        lo = np.minimum(np.searchsorted(self._sorted, prefix), n - 1)
        hit = self._sorted[lo] == prefix
        shared = hit & (lo + 1 < n) & (self._sorted[np.minimum(lo + 1, n - 1)] == prefix)
        single = np.flatnonzero(hit & ~shared)
        cand = self._order[lo[single]]
        rows = cand[(self.raw[cand] == want[single]).all(axis=1)].tolist()
        for j in np.flatnonzero(shared):  # a 64-bit key shared by several ids: compare in full
            r = lo[j]
            while r < n and self._sorted[r] == prefix[j]:
                if np.array_equal(self.raw[self._order[r]], want[j]):
                    rows.append(int(self._order[r]))
                    break
                r += 1
        return np.unique(np.array(rows, np.int64))


def _fold(raw: np.ndarray) -> np.ndarray:
    words = np.ascontiguousarray(raw).view("<u8").reshape(-1, 4)
    return np.bitwise_xor.reduce(words, axis=1)


@dataclass
class CompactMatrix:
    """Row ``i`` of ``index`` is image ``ids.image_id(i)``; ``ids.rows_of`` maps back."""

    index: "object"            # faiss.IndexScalarQuantizer, inner product, d = k
    ids: ImageIdTable
    mean: np.ndarray           # (d_full,) float32
    components: np.ndarray     # (k, d_full) float32
    model: str
    features_version: int
    path: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Decoded (approximate) PCA vectors of ``rows``: what models train on."""
        rows = np.asarray(rows, np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.k), np.float32)
        return self.index.reconstruct_batch(rows)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Full embeddings → PCA space (L2-normalised first, as the build did)."""
        x = np.asarray(embeddings, np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return (x - self.mean) @ self.components.T


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def compact_dir(lake: Lake, model: str, features_version: int, k: int) -> str:
    return lake.artifacts_dir("suggest", _slug(model), f"v{features_version}-pca{k}")


def _one_blas_thread():
    """BLAS on one thread for the matrix's arithmetic. A multi-threaded ``eigh`` or ``sgemm`` rounds
    differently with the thread count, so the same vectors gave a matrix of other bytes in another
    process (an API server limits itself to one thread, a CLI run did not): with one thread a build
    is the same bytes wherever it is made. On 2 cores it costs little (1280-d ``eigh`` 0.51 s
    against 0.36 s idle) and wins under load (3.6 s against 17.6 s at load 23)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - installed with the index extra
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_pca(x: np.ndarray, k: int, sample: int = 50_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top-``k`` principal axes (rows) of ``x``, fitted on at most ``sample`` rows;
    the same bits for the same ``x`` in any process (see :func:`_one_blas_thread`)."""
    rng = np.random.default_rng(seed)
    fit = x if len(x) <= sample else x[np.sort(rng.choice(len(x), sample, replace=False))]
    mean = fit.mean(axis=0, dtype=np.float64)
    centered = (fit - mean).astype(np.float64)
    with _one_blas_thread():
        cov = centered.T @ centered / max(1, len(fit) - 1)
        values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:min(k, x.shape[1])]
    return mean.astype(np.float32), np.ascontiguousarray(vectors[:, order].T.astype(np.float32))


def build_compact(folder: str, image_ids: list[str], pca_vectors_or_embeddings: np.ndarray, *, model: str,
                  features_version: int, k: int, mean: np.ndarray | None = None,
                  components: np.ndarray | None = None) -> str:
    """Write a build into ``folder`` (temp names, manifest last). With ``mean``/``components`` the
    input is full embeddings to project; without, it is already PCA vectors (benchmarks)."""
    import faiss

    os.makedirs(folder, exist_ok=True)
    x = np.asarray(pca_vectors_or_embeddings, np.float32)
    if mean is None or components is None:
        mean, components = np.zeros(x.shape[1], np.float32), np.eye(x.shape[1], dtype=np.float32)
        pca = x
    else:
        pca = np.empty((len(x), components.shape[0]), np.float32)
        with _one_blas_thread():  # the same bytes in any process
            for start in range(0, len(x), 65536):
                part = x[start:start + 65536]
                part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
                pca[start:start + 65536] = (part - mean) @ components.T
    index = faiss.IndexScalarQuantizer(pca.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(pca if len(pca) <= 200_000 else pca[rng.choice(len(pca), 200_000, replace=False)])
    index.add(pca)
    files = {"index.faiss": None, "image_ids.bin": None, "pca.npz": None}
    faiss.write_index(index, os.path.join(folder, "index.faiss.tmp"))
    with open(os.path.join(folder, "image_ids.bin.tmp"), "wb") as f:
        f.write(b"".join(bytes.fromhex(i) for i in image_ids))
    with open(os.path.join(folder, "pca.npz.tmp"), "wb") as f:
        np.savez(f, mean=mean, components=components)
    for name in files:
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
        files[name] = {"sha256": file_sha256(os.path.join(folder, name)),
                       "bytes": os.path.getsize(os.path.join(folder, name))}
    manifest = {"format": FORMAT, "model": model, "features_version": features_version, "k": int(pca.shape[1]),
                "rows": len(image_ids), "kind": "pca-sq8-ip", "faiss_version": faiss.__version__, "files": files}
    tmp = os.path.join(folder, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "manifest.json"))
    return folder


def compact_key(model: str, features_version: int, k: int) -> str:
    """The store key of a build's folder (``artifacts/suggest/<model>/v<version>-pca<k>``)."""
    return f"artifacts/suggest/{_slug(model)}/v{features_version}-pca{k}"


_FILES = ("index.faiss", "image_ids.bin", "pca.npz")


def place_compact(store, folder: str, prefix: str) -> None:
    """Upload a finished local build folder to ``prefix`` in the store, the manifest last."""
    for name in _FILES:
        store.upload(f"{prefix}/{name}", os.path.join(folder, name))
    store.upload(f"{prefix}/manifest.json", os.path.join(folder, "manifest.json"))


def load_compact_from_store(store, cache, prefix: str) -> CompactMatrix:
    """Map a build in an object store: its files are fetched through ``cache`` (an
    :class:`lake.artifact_cache.ArtifactCache`, which checks sizes and sha256 against the manifest).

    Raises:
        NotFound: no manifest. CorruptArtifact: a file differs from the manifest.
    """
    try:
        manifest = json.loads(store.read_bytes(f"{prefix}/manifest.json"))
    except NotFound:
        raise NotFound(f"no suggestion matrix at {prefix}") from None
    paths = {}
    for name, meta in manifest["files"].items():
        try:
            paths[name] = cache.path(store, f"{prefix}/{name}", sha256=meta["sha256"], size=meta["bytes"])
        except NotFound:
            raise CorruptArtifact(f"suggestion matrix {prefix}: {name} is missing; it is rebuilt once the "
                                  "folder is removed") from None
    return _map(manifest, paths, store.uri(prefix))


def _map(manifest: dict, paths: dict[str, str], folder: str) -> CompactMatrix:
    import faiss

    index = faiss.read_index(paths["index.faiss"], faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    ids = ImageIdTable(paths["image_ids.bin"])
    if len(ids) != index.ntotal:
        raise CorruptArtifact(f"suggestion matrix {folder}: {len(ids)} ids for {index.ntotal} rows")
    with np.load(paths["pca.npz"]) as pca:
        mean, components = pca["mean"], pca["components"]
    return CompactMatrix(index, ids, mean, components, manifest["model"], manifest["features_version"], folder)


def load_compact(folder: str, *, verify: bool = True) -> CompactMatrix:
    """Memory-map a build after checking its manifest.

    Raises:
        NotFound: no manifest (not built, or a build that never finished).
        CorruptArtifact: a file's size or sha256 differs from the manifest.
    """
    import faiss

    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"no suggestion matrix at {folder}") from None
    for name, meta in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != meta["bytes"] or (verify and file_sha256(path) != meta["sha256"]):
            raise CorruptArtifact(f"suggestion matrix file {path} does not match its manifest; delete {folder} "
                                  "and it is rebuilt on the next request")
    return _map(manifest, {name: os.path.join(folder, name) for name in manifest["files"]}, folder)


def ensure_compact(lake: Lake, k: int = 128, model: str | None = None, cache=None) -> CompactMatrix:
    """The build for the lake's current features (default model), building it first if absent.

    One process builds (under the ``suggest-build`` lock); the others wait, then map it.

    Raises:
        NotFound: no features yet (run ``imagelake embed``).
    """
    from lake.commit import open_table
    from lake.vectors import default_model_key, load_embeddings

    model = model or default_model_key(lake)
    if lake.is_local:
        version = open_table(lake, "features").version()
    else:
        from deltalake.exceptions import TableNotFoundError

        from lake.store import open_delta

        try:
            version = open_delta(lake, "features").version()  # bounded timeouts: a server asks this
        except TableNotFoundError:
            raise NotFound("no features in the lake yet; run `imagelake embed` first") from None
    if not lake.is_local:
        return _ensure_in_store(lake, k, model, version, cache)
    folder = compact_dir(lake, model, version, k)
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        return load_compact(folder)
    with LakeLock(lake, "suggest-build", timeout=3600, holder=f"suggest matrix {model} v{version}"):
        if not os.path.isfile(os.path.join(folder, "manifest.json")):
            emb = load_embeddings(lake, model)
            if len(emb) == 0:
                raise NotFound("no features in the lake yet; run `imagelake embed` first")
            x = emb.normalized()
            mean, components = fit_pca(x, k)
            build_compact(folder, emb.image_ids, x, model=model, features_version=version, k=k,
                          mean=mean, components=components)
    return load_compact(folder)


def _ensure_in_store(lake: Lake, k: int, model: str, version: int, cache) -> CompactMatrix:
    import tempfile

    from lake.artifact_cache import artifact_cache
    from lake.store import LakeStore
    from lake.vectors import load_embeddings

    store, cache = LakeStore.for_lake(lake), cache or artifact_cache()
    prefix = compact_key(model, version, k)
    if not store.exists(f"{prefix}/manifest.json"):
        with LakeLock(lake, "suggest-build", timeout=3600, holder=f"suggest matrix {model} v{version}"):
            if not store.exists(f"{prefix}/manifest.json"):
                emb = load_embeddings(lake, model)
                if len(emb) == 0:
                    raise NotFound("no features in the lake yet; run `imagelake embed` first")
                x = emb.normalized()
                mean, components = fit_pca(x, k)
                with tempfile.TemporaryDirectory(prefix="imagelake-suggest-") as tmp:
                    build_compact(tmp, emb.image_ids, x, model=model, features_version=version, k=k,
                                  mean=mean, components=components)
                    place_compact(store, tmp, prefix)
    return load_compact_from_store(store, cache, prefix)
