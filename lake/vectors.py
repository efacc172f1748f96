"""Embeddings as NumPy: the bridge from the ``features`` table to FAISS, clustering and layouts.

Every vector job and service reads embeddings through :func:`load_embeddings`, which joins
``features`` to ``images`` so that each row carries the image's ``seq`` (the FAISS id) and returns
them sorted by ``seq``. Memory: n × d × 4 bytes (1M × 1280 ≈ 5 GB); pass ``where``/``limit`` or
``seqs`` to read a subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import NotFound

__all__ = ["Embeddings", "load_embeddings", "load_few_embeddings", "embedded_seqs", "default_model_key", "features_key",
           "list_to_matrix"]


@dataclass(frozen=True)
class Embeddings:
    """Rows sorted by ``seq``: ``vectors[i]`` is the embedding of ``image_ids[i]`` (FAISS id ``seqs[i]``)."""

    model: str
    seqs: np.ndarray        # int64 (n,)
    image_ids: list[str]
    vectors: np.ndarray     # float32 (n, d), as stored (EfficientNet features are not L2-normalised)
    features_version: int   # the features table's Delta version that was read

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def normalized(self) -> np.ndarray:
        """Unit-length copies (cosine similarity = inner product)."""
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        return self.vectors / np.maximum(norms, 1e-12)


def list_to_matrix(column: pa.ChunkedArray | pa.Array, d: int | None = None) -> np.ndarray:
    """A list<float32> column of equal-length rows → a C-contiguous float32 (n, d) matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    n = len(column)
    if n == 0:
        return np.zeros((0, d or 0), np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    width = len(values) // n
    if width * n != len(values) or (d is not None and width != d):
        raise ValueError("embeddings of different lengths in one model")
    return np.ascontiguousarray(values.reshape(n, width))


def default_model_key(lake: Lake) -> str:
    """The features key (``name@version``, maybe ``+bf16``) with the most rows: what jobs use when not told.

    Raises:
        NotFound: the features table is empty (run ``imagelake embed`` first).
    """
    features = open_table(lake, "features")
    con = duckdb.connect()
    try:
        con.register("features", features.to_pyarrow_dataset())
        rows = con.sql("SELECT model, count(*) n FROM features GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1").fetchall()
    finally:
        con.close()
    if not rows:
        raise NotFound("no features in the lake yet; run `imagelake embed` first")
    return rows[0][0]


def features_key(lake: Lake, model_key: str) -> str | None:
    """The stored features key of ``model_key`` (``name@version``) with the most rows, whatever
    its precision (``name@version`` = fp32, ``name@version+bf16``, ...); fp32 wins a tie. None
    when the lake has no features of that model version."""
    features = open_table(lake, "features")
    if not features.file_uris():
        return None
    con = duckdb.connect()
    try:
        con.register("features", features.to_pyarrow_dataset())
        rows = con.sql("SELECT model, count(*) n FROM features WHERE model = $k OR starts_with(model, $k || '+') "
                       "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1", params={"k": model_key}).fetchall()
    finally:
        con.close()
    return rows[0][0] if rows else None


def load_embeddings(lake: Lake, model: str | None = None, *, where: str | None = None,
                    seqs: np.ndarray | None = None, limit: int | None = None) -> Embeddings:
    """Embeddings of ``model`` (default: :func:`default_model_key`) sorted by ``seq``.

    Args:
        where: a trusted SQL predicate over ``images`` columns (alias ``i``); never user text.
        seqs: only these seqs.
        limit: at most this many rows (the lowest seqs).
    """
    model = model or default_model_key(lake)
    features, images = open_table(lake, "features"), open_table(lake, "images")
    con = duckdb.connect()
    try:
        con.register("features", features.to_pyarrow_dataset())
        con.register("images", images.to_pyarrow_dataset())
        clauses, params = ["f.model = ?"], [model]
        if where:
            clauses.append(f"({where})")
        if seqs is not None:
            con.register("wanted", pa.table({"seq": pa.array(np.asarray(seqs, np.int64))}))
            clauses.append("i.seq IN (SELECT seq FROM wanted)")
        sql = (f"SELECT i.seq, f.image_id, f.embedding FROM features f JOIN images i USING (image_id) "
               f"WHERE {' AND '.join(clauses)} ORDER BY i.seq" + (f" LIMIT {int(limit)}" if limit else ""))
        table = _arrow(con, sql, params)
    finally:
        con.close()
    return Embeddings(model=model, seqs=table.column("seq").to_numpy().astype(np.int64),
                      image_ids=table.column("image_id").to_pylist(),
                      vectors=list_to_matrix(table.column("embedding")),
                      features_version=features.version())


def embedded_seqs(lake: Lake, key: str) -> tuple[np.ndarray, list[str]]:
    """(seqs, image ids) of the images with features under ``key``, sorted by seq; no vector is read."""
    con = duckdb.connect()
    try:
        con.register("features", open_table(lake, "features").to_pyarrow_dataset())
        con.register("images", open_table(lake, "images").to_pyarrow_dataset())
        t = _arrow(con, "SELECT i.seq, i.image_id FROM images i WHERE i.image_id IN "
                   "(SELECT image_id FROM features WHERE model = ?) ORDER BY i.seq", [key])
    finally:
        con.close()
    return t.column("seq").to_numpy().astype(np.int64), t.column("image_id").to_pylist()


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> pa.Table:
    # DuckDB 2.0 warns on execute(...).arrow(); a prepared relation via sql() takes params.
    return con.sql(sql, params=params).to_arrow_table()


def load_few_embeddings(lake: Lake, key: str, seqs: np.ndarray) -> Embeddings:
    """The vectors of ``seqs`` (few: a run's new images) under ``key``, sorted by seq, reading the
    embedding column only of the ``features`` files that hold them: a join over the whole table
    (:func:`load_embeddings`) decodes every vector (6.6 of the 9.7 CPU-s of a placed grid run at
    100k, measured)."""
    import pyarrow.compute as pc

    images = open_table(lake, "images").to_pyarrow_dataset().to_table(
        columns=["seq", "image_id"], filter=pc.field("seq").isin(pa.array(np.asarray(seqs, np.int64))))
    wanted = images.column("image_id").combine_chunks() if images.num_rows else pa.array([], pa.string())
    features = open_table(lake, "features")
    parts = []
    if len(wanted):
        mine = (pc.field("model") == key) & pc.field("image_id").isin(wanted)
        for fragment in features.to_pyarrow_dataset().get_fragments():
            if fragment.to_table(columns=["image_id"], filter=mine).num_rows:
                parts.append(fragment.to_table(columns=["image_id", "embedding"], filter=mine))
    got = pa.concat_tables(parts) if parts else pa.table({"image_id": pa.array([], pa.string()),
                                                          "embedding": pa.array([], pa.list_(pa.float32()))})
    seq_of = dict(zip(images.column("image_id").to_pylist(), images.column("seq").to_pylist()))
    ids = got.column("image_id").to_pylist()
    first = {}
    for row, image_id in enumerate(ids):   # one row per image (a features commit drops repeated keys)
        first.setdefault(image_id, row)
    order = sorted(first.values(), key=lambda r: seq_of[ids[r]])
    vectors = list_to_matrix(got.column("embedding").take(pa.array(order, pa.int64()))) if order else \
        np.zeros((0, 0), np.float32)
    return Embeddings(model=key, seqs=np.array([seq_of[ids[r]] for r in order], np.int64),
                      image_ids=[ids[r] for r in order], vectors=vectors, features_version=features.version())
