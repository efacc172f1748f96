"""The current tags, from the append-only ``tags`` table.

* ``user``: the latest user row per (image, tag) decides — action ``add`` shows the tag, ``remove``
  hides it from every source for that image (a correction of a model tag);
* ``concept``: every concept row;
* ``learned``: the rows of the latest tag run that wrote learned tags.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from lake.catalog import Lake
from lake.commit import open_table

__all__ = ["CURRENT_TAGS_SQL", "current_tags", "user_labels"]

# A SELECT over the table ``tags``: one row per shown (image_id, tag, source) with its score and model.
CURRENT_TAGS_SQL = """
WITH u AS (SELECT image_id, tag, arg_max(coalesce(action, 'add'), created_at) AS act,
                  max(created_at) AS at FROM tags WHERE source = 'user' GROUP BY image_id, tag),
lr AS (SELECT max(run_id) AS r FROM tags WHERE source = 'learned'),
cur AS (
  SELECT image_id, tag, 'user' AS source, CAST(1.0 AS FLOAT) AS score, CAST(NULL AS VARCHAR) AS model FROM u WHERE act = 'add'
  UNION ALL SELECT image_id, tag, source, score, model FROM tags WHERE source = 'concept'
  UNION ALL SELECT image_id, tag, source, score, model FROM tags WHERE source = 'learned' AND run_id = (SELECT r FROM lr))
SELECT c.* FROM cur c WHERE NOT EXISTS (
  SELECT 1 FROM u WHERE u.image_id = c.image_id AND u.tag = c.tag AND u.act = 'remove')
"""


def _query(lake: Lake, sql: str, params: dict | None = None) -> pa.Table:
    tags = open_table(lake, "tags")
    con = duckdb.connect()
    try:
        if tags.file_uris():
            con.register("tags", tags.to_pyarrow_dataset())
        else:
            from lake.catalog import TABLES
            con.register("tags", TABLES["tags"].schema.empty_table())
        return con.sql(sql, params=params or {}).to_arrow_table()
    finally:
        con.close()


def current_tags(lake: Lake, image_id: str | None = None) -> pa.Table:
    """Current tags (image_id, tag, source, score, model), of one image or all."""
    if image_id is None:
        return _query(lake, CURRENT_TAGS_SQL)
    return _query(lake, f"SELECT * FROM ({CURRENT_TAGS_SQL}) WHERE image_id = $id ORDER BY source, score DESC, tag",
                  {"id": image_id})


def user_labels(lake: Lake) -> list[tuple[str, str]]:
    """(image_id, tag) of every current user tag: the learned model's training labels."""
    t = _query(lake, f"SELECT image_id, tag FROM ({CURRENT_TAGS_SQL}) WHERE source = 'user' ORDER BY 1, 2")
    return list(zip(t.column("image_id").to_pylist(), t.column("tag").to_pylist()))
