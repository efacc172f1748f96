"""Bring your own embeddings: ``imagelake embed --import FILE --model NAME@VERSION``.

Reads vectors computed elsewhere (CLIP, DINOv2, a fastdup or FiftyOne export, ...) and writes them
to ``features`` under the features key ``NAME@VERSION``, exactly as the embed job writes its own:
one row per image, ``embedding`` as float32, ``concept_ids``/``concept_probs`` the top 50 of the
optional concept probabilities. Every later step (index, cluster, tag, grid, suggest, search) then
works on them with ``--model NAME@VERSION``.

Input formats:

* **Parquet** (``.parquet``/``.pq``): a key column (``image_id``, or ``uri``: any path ingest saw,
  looked up in ``sources``), ``embedding`` (list or fixed-size list of floats) and optionally
  ``concept_probs`` (one probability per ImageNet-1k class, in class order; the top 50 are kept).
* **NumPy ``.npz``**: arrays ``embedding`` (or ``embeddings``), ``image_id`` or ``uri`` (strings),
  optionally ``concept_probs`` (n × classes).
* **NumPy ``.npy``**: the n × d matrix alone; ``--keys FILE`` names its rows (one image id or URI a
  line; ``--key`` says which, default image_id).

Validation, row by row: the key must name an image of the lake (``unknown_key``), appear once in
the file (``duplicate_key``), the vector must have the key's dimension (``bad_dimension``: the
dimension already stored under the key, else ``--dim``, else the first row's), be finite
(``not_finite``) and non-zero (``zero_vector``: cosine similarity is undefined), and concept
probabilities must be finite and in [0, 1] (``bad_probs``). Bad rows go to
``embedding_rejects`` with the reason; they never stop the import. Rows whose image already has
features under the key are skipped (``already``): importing the same file again adds nothing.

Bounded memory: the file is read ``batch_rows`` rows at a time (:mod:`jobs.embed.import_files`:
``.npy`` is memory-mapped; an ``.npz`` member is loaded whole, as NumPy has no lazy reader for it),
each batch becomes one staged Parquet file, and one commit at the end adds them all (a crash
before it leaves nothing). Two background threads overlap the work of a batch with reading the
next and writing the one before (Parquet decoding and encoding release the GIL).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.embed.import_files import prefetched, read_numpy, read_parquet
from jobs.runs import job_run
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, commit_staged, ensure_tables, now_utc, open_table
from lake.errors import BadInput, NotFound
from lake.settings import Settings
from lake.staging import filesystem_for

__all__ = ["import_embeddings", "ImportResult", "REASONS", "check_key"]

log = logging.getLogger("imagelake.jobs.embed.importer")

REASONS = ("unknown_key", "duplicate_key", "bad_dimension", "not_finite", "zero_vector", "bad_probs", "null")
TOP_K = 50
_EXAMPLES = 5


@dataclass
class ImportResult:
    run_id: str
    model: str
    source_file: str
    d: int | None = None
    rows: int = 0
    imported: int = 0
    already: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    features_version: int | None = None

    @property
    def vectors_per_s(self) -> float:
        return round(self.rows / self.seconds, 1) if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [f"embed import {self.run_id}: {self.rows} rows read from {self.source_file}, {self.imported} imported "
               f"under {self.model} (d={self.d}), {self.already} already there, {self.rejected} rejected, "
               f"in {self.seconds:.1f} s ({self.vectors_per_s:.0f} vectors/s)"]
        if self.rejected:
            out.append("rejected: " + ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items())))
            for e in self.examples:
                out.append(f"  row {e['row_number']} key {e['key']!r}: {e['reason']}: {e['detail']}")
            out.append("all of them: imagelake sql \"SELECT * FROM embedding_rejects WHERE run_id = "
                       f"'{self.run_id}'\"")
        return out


def check_key(model: str) -> str:
    """An imported features key is ``name@version`` and must not be a registry model's name (uploads
    and ``imagelake embed`` would compute other vectors under it).

    Raises:
        BadInput: no ``@``, an empty part, a precision suffix, or a registry model's name.
    """
    name, sep, version = model.partition("@")
    if not sep or not name or not version or "+" in version or any(c.isspace() for c in model):
        raise BadInput(f"--import needs --model NAME@VERSION (e.g. clip-vit-b32@1), the features key the "
                       f"vectors are stored under; got {model!r}")
    try:
        from jobs.embed.models import MODELS
    except ImportError:  # no embed extra: nothing to collide with
        return model
    if name in MODELS:
        raise BadInput(f"{name!r} is a built-in model (imagelake embed computes it); name imported vectors "
                       "otherwise, e.g. my-" + name + "@1")
    return model


# -- validation -----------------------------------------------------------------------------------

def _lengths(arr: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(arr.type):
        n = np.full(len(arr), arr.type.list_size, np.int64)
        return np.where(arr.is_null().to_numpy(zero_copy_only=False), -1, n)
    return pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _matrix(arr: pa.Array, d: int) -> np.ndarray:
    """Rows of equal length ``d`` (nulls already removed) → float32 (n, d)."""
    if len(arr) == 0:
        return np.zeros((0, d), np.float32)
    if pa.types.is_fixed_size_list(arr.type):
        values = arr.flatten()
    else:
        values = pc.list_flatten(arr)
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), d)


def _take(arr: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    return arr if len(rows) == n else arr.take(pa.array(rows))


def _lookup(lake: Lake, key: str) -> tuple[pa.Array, pa.Array]:
    """(the lake's values of ``key``, the image_id each one names) for key image_id or uri."""
    if key == "image_id":
        t = open_table(lake, "images")
        ids = t.to_pyarrow_dataset().to_table(columns=["image_id"]).column("image_id").combine_chunks() \
            if t.file_uris() else pa.array([], pa.string())
        return ids, ids
    if key == "uri":
        t = open_table(lake, "sources")
        if not t.file_uris():
            return pa.array([], pa.string()), pa.array([], pa.string())
        # a path re-ingested with new content has several rows; the newest content wins
        tab = t.to_pyarrow_dataset().to_table(columns=["uri", "image_id", "ingested_at"])
        tab = tab.sort_by([("uri", "ascending"), ("ingested_at", "descending")])
        uris = tab.column("uri").combine_chunks()
        first = np.ones(len(uris), bool)
        if len(uris) > 1:
            u = uris.to_numpy(zero_copy_only=False)
            first[1:] = u[1:] != u[:-1]
        keep = pa.array(first)
        return uris.filter(keep), tab.column("image_id").combine_chunks().filter(keep)
    raise BadInput(f"--key must be image_id or uri, got {key!r}")


def _stored(lake: Lake, model: str) -> tuple[pa.Array, int | None]:
    """The image ids that already have features under ``model`` and their dimension."""
    import duckdb

    t = open_table(lake, "features")
    if not t.file_uris():
        return pa.array([], pa.string()), None
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        con.register("features", t.to_pyarrow_dataset())
        ids = con.sql("SELECT image_id FROM features WHERE model = $m", params={"m": model}).to_arrow_table()
        d = con.sql("SELECT len(embedding) FROM features WHERE model = $m LIMIT 1", params={"m": model}).fetchall()
    finally:
        con.close()
    return ids.column("image_id").combine_chunks(), (int(d[0][0]) if d else None)


def _top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` largest probabilities and their class ids, largest first.

    The k-th largest value per row (``np.partition``, values only), then the classes at or above it:
    three times faster than ``argpartition`` over 1,000 classes. Rows with ties at the k-th value
    (more than ``k`` classes at or above it) take the ``argpartition`` path."""
    k = min(k, probs.shape[1])
    if k < probs.shape[1] and len(probs):
        cut = probs.shape[1] - k
        thr = np.partition(probs, cut, axis=1)[:, cut]
        mask = probs >= thr[:, None]
        if (np.count_nonzero(mask, axis=1) == k).all():
            idx = np.nonzero(mask)[1].reshape(-1, k)
        else:
            idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        idx = np.tile(np.arange(k), (len(probs), 1))
    part = np.take_along_axis(probs, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int16), np.take_along_axis(part, order, axis=1)


_FLAT_FEATURES = [f.name for f in TABLES["features"].schema if not pa.types.is_nested(f.type)]


def _write_part(fs, name: str, table: pa.Table) -> None:
    """One staged features file; statistics for the flat columns only (the commit states those; min
    and max over a million vector values are of no use and cost a tenth of the write)."""
    with fs.open_output_stream(name) as sink:
        pq.write_table(table, sink, compression="zstd", compression_level=1,
                       use_dictionary=["model", "run_id", "created_at"], write_statistics=_FLAT_FEATURES)


class _Writes:
    """Staged files written on one background thread while the next batch is checked (Parquet
    encoding releases the GIL), at most two batches in flight; :meth:`close` waits and re-raises."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool, self._pending = ThreadPoolExecutor(1, thread_name_prefix="import-write"), []

    def submit(self, fn, *args) -> None:
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args))

    def close(self, raise_errors: bool = True) -> None:
        try:
            for f in self._pending:
                if raise_errors:
                    f.result()
                else:
                    f.exception()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)


def _list_column(matrix: np.ndarray, type_: pa.DataType) -> pa.Array:
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).reshape(-1), type_))


# -- the import -----------------------------------------------------------------------------------

def import_embeddings(lake: Lake, settings: Settings | None, path: str, model: str, *, key: str | None = None,
                      keys_file: str | None = None, dim: int | None = None, batch_rows: int = 16384,
                      top_k: int = TOP_K) -> ImportResult:
    """Import the embeddings of ``path`` under features key ``model`` (see the module docstring).

    Raises:
        BadInput: a bad key name, an unreadable or malformed file, ``--dim`` against the stored one.
        NotFound: the file does not exist.
    """
    model = check_key(model)
    if key not in (None, "image_id", "uri"):
        raise BadInput(f"--key must be image_id or uri, got {key!r}")
    if dim is not None and dim <= 0:
        raise BadInput(f"--dim must be positive, got {dim}")
    if batch_rows <= 0:
        raise BadInput(f"batch_rows must be positive, got {batch_rows}")
    if not os.path.isfile(path):
        raise NotFound(f"no file {path}")
    if keys_file is not None and not os.path.isfile(keys_file):
        raise NotFound(f"no file {keys_file}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".parquet", ".pq", ".npy", ".npz"):
        raise BadInput(f"{path}: embeddings are read from .parquet, .npz or .npy files, not {ext or 'no extension'}")
    lake.ensure()
    ensure_tables(lake, ["images", "sources", "features", "embedding_rejects", "job_runs"])
    args = dict(file=os.path.abspath(path), model=model, key=key, keys=keys_file, dim=dim)
    with job_run(lake, "embed-import", args, settings=settings) as run:
        t0 = time.perf_counter()
        try:
            if ext in (".npy", ".npz"):
                key, batches, total = read_numpy(path, key, keys_file, batch_rows)
            else:
                key, batches, total = read_parquet(path, key, batch_rows)
        except (OSError, ValueError, pa.ArrowException) as e:
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"{path}: cannot read it as {ext[1:]}: {e}") from None
        res = ImportResult(run.run_id, model, os.path.abspath(path))
        run.rows_in = total
        lake_keys, lake_ids = _lookup(lake, key)
        stored_ids, stored_d = _stored(lake, model)
        if dim is not None and stored_d is not None and dim != stored_d:
            raise BadInput(f"--dim {dim}, but the vectors stored under {model} have {stored_d} dimensions")
        res.d = stored_d or dim
        seen = pa.array([], pa.string())
        staging = lake.staging_dir(run.run_id)
        fs, base = filesystem_for(staging)
        fs.create_dir(f"{base}/features", recursive=True)
        files, reject_rows, row0 = [], [], 0
        created = now_utc()
        writes = _Writes()
        try:
            for b in prefetched(batches):
                n = len(b.keys)
                reason = np.full(n, "", object)
                detail = np.full(n, "", object)

                def reject(mask: np.ndarray, why: str, text) -> None:
                    m = mask & (reason == "")
                    if m.any():
                        reason[m] = why
                        detail[m] = text(m) if callable(text) else text

                keys_np = b.keys.to_numpy(zero_copy_only=False)
                reject(b.keys.is_null().to_numpy(zero_copy_only=False) | (keys_np == ""), "null", f"no {key}")
                idx = pc.index_in(b.keys, value_set=lake_keys)
                reject(idx.is_null().to_numpy(zero_copy_only=False), "unknown_key", f"no image of the lake has this {key}")
                image_ids = lake_ids.take(pc.fill_null(idx, 0)) if len(lake_ids) else pa.nulls(n, pa.string())
                # duplicates: within the file (earlier batches and this one); the first row wins
                dup = pc.is_in(image_ids, value_set=seen).to_numpy(zero_copy_only=False)
                ok_so_far = reason == ""
                firsts = pa.table({"id": image_ids, "i": pa.array(np.arange(n))}).filter(pa.array(ok_so_far)) \
                    .group_by("id").aggregate([("i", "min")]).column("i_min").to_numpy()
                within = np.ones(n, bool)
                within[firsts] = False
                reject(ok_so_far & (dup | within), "duplicate_key", "the file names this image in an earlier row")
                lengths = _lengths(b.vectors)
                reject(lengths < 0, "null", "no embedding")
                if res.d is None:
                    good = lengths[(reason == "") & (lengths > 0)]
                    if len(good):
                        res.d = int(good[0])
                d = res.d or 0
                reject((lengths != d) & (lengths >= 0), "bad_dimension",
                       lambda m: [f"{int(x)} values, expected {d}" for x in lengths[m]])
                rows_ok = np.flatnonzero(reason == "")
                mat = _matrix(_take(b.vectors, rows_ok, n), d) if len(rows_ok) else np.zeros((0, d), np.float32)
                # one pass: the squared norm is NaN/inf for a NaN, an infinity or a value too large to square
                with np.errstate(invalid="ignore", over="ignore"):
                    norm2 = np.einsum("ij,ij->i", mat, mat) if len(mat) else np.zeros(0, np.float32)
                finite = np.isfinite(norm2)
                bad = np.zeros(n, bool)
                bad[rows_ok[~finite]] = True
                reject(bad, "not_finite", "NaN or infinite values (or values too large to square in float32)")
                zero = np.zeros(n, bool)
                zero[rows_ok[finite & (norm2 == 0)]] = True
                reject(zero, "zero_vector", "all values are 0 (no direction to compare)")
                probs_mat = None
                if b.probs is not None:
                    plen = _lengths(b.probs)
                    ok = reason == ""
                    has = ok & (plen > 0)
                    width = int(plen[has][0]) if has.any() else 0
                    reject(ok & (plen >= 0) & (plen != width), "bad_probs",
                           lambda m: [f"{int(x)} concept probabilities, the file's others have {width}" for x in plen[m]])
                    if width > 32767:
                        raise BadInput(f"{path}: {width} concept probabilities per row; at most 32767 classes")
                keep = np.flatnonzero(reason == "")
                if b.probs is not None and len(keep):
                    pl = _lengths(b.probs)[keep]
                    with_p = pl > 0
                    if with_p.all():
                        probs_mat = _matrix(_take(b.probs, keep, n), width)
                    else:
                        probs_mat = np.full((len(keep), width), np.nan, np.float32)
                        if with_p.any():
                            probs_mat[with_p] = _matrix(_take(b.probs, keep[with_p], n), width)
                    with np.errstate(invalid="ignore"):  # a NaN makes the row's min and max NaN: out of range
                        in_range = (probs_mat.min(axis=1, initial=np.inf) >= 0) & \
                            (probs_mat.max(axis=1, initial=-np.inf) <= 1 + 1e-4)
                    bad_p = with_p & ~in_range
                    m = np.zeros(n, bool)
                    m[keep[bad_p]] = True
                    reject(m, "bad_probs", "concept probabilities must be finite and in [0, 1]")
                    probs_mat = probs_mat[~bad_p]
                    with_p = with_p[~bad_p]
                    keep = np.flatnonzero(reason == "")
                # already stored under the key: skipped, not rejected (re-import adds nothing)
                if len(keep):
                    present = pc.is_in(image_ids.take(pa.array(keep)), value_set=stored_ids).to_numpy(zero_copy_only=False)
                    res.already += int(present.sum())
                    seen = pa.concat_arrays([seen, image_ids.take(pa.array(keep[present]))])
                    sel = ~present
                    new = keep[sel]
                    if len(new):
                        vec = mat if len(new) == len(rows_ok) else mat[np.searchsorted(rows_ok, new)]
                        ids_new = image_ids.take(pa.array(new))
                        seen = pa.concat_arrays([seen, ids_new])
                        if probs_mat is not None and with_p[sel].any():
                            pm, wp = probs_mat[sel], with_p[sel]
                            cids, cprobs = _top_k(np.where(wp[:, None], pm, 0) if not wp.all() else pm, top_k)
                            cid_col = pa.array([list(r) if w else None for r, w in zip(cids, wp)], pa.list_(pa.int16())) \
                                if not wp.all() else _list_column(cids, pa.int16())
                            cp_col = pa.array([list(r) if w else None for r, w in zip(cprobs, wp)], pa.list_(pa.float32())) \
                                if not wp.all() else _list_column(cprobs, pa.float32())
                        else:
                            cid_col = pa.nulls(len(new), pa.list_(pa.int16()))
                            cp_col = pa.nulls(len(new), pa.list_(pa.float32()))
                        out = pa.table({
                            "image_id": ids_new, "model": pa.array([model] * len(new), pa.string()),
                            "embedding": _list_column(vec, pa.float32()), "concept_ids": cid_col,
                            "concept_probs": cp_col, "run_id": pa.array([run.run_id] * len(new), pa.string()),
                            "created_at": pa.array([created] * len(new), TABLES["features"].schema.field("created_at").type),
                        }, schema=TABLES["features"].schema)
                        writes.submit(_write_part, fs, f"{base}/features/part-{len(files):05d}.parquet", out)
                        files.append(staging + f"/features/part-{len(files):05d}.parquet")
                        res.imported += len(new)
                bad_rows = np.flatnonzero(reason != "")
                for i in bad_rows:
                    r = reason[i]
                    res.reasons[r] = res.reasons.get(r, 0) + 1
                    row = dict(run_id=run.run_id, model=model, source_file=res.source_file, row_number=row0 + int(i) + 1,
                               key=keys_np[i] if keys_np[i] is not None else None, reason=r, detail=str(detail[i]),
                               rejected_at=created)
                    reject_rows.append(row)
                    if len(res.examples) < _EXAMPLES:
                        res.examples.append(row)
                res.rejected += len(bad_rows)
                res.rows += n
                row0 += n
        except BaseException:
            writes.close(raise_errors=False)
            raise
        writes.close()
        feats = commit_staged(lake, "features", files, run_id=run.run_id, dedupe=True)
        if reject_rows:
            commit_rows(lake, "embedding_rejects", reject_rows, run_id=run.run_id, dedupe=True)
        try:
            fs.delete_dir(base)
        except (FileNotFoundError, OSError):
            pass
        res.features_version = feats.version
        res.seconds = round(time.perf_counter() - t0, 3)
        run.rows_out = res.imported
        run.metrics.update(dict(model=model, d=res.d, rows=res.rows, imported=res.imported, already=res.already,
                                rejected=res.rejected, reasons=res.reasons, vectors_per_s=res.vectors_per_s))
    return res
