"""``imagelake export``: a folder of symlinks to a cluster's (or bucket's) images, as imagecluster does.

Links point at each image's ``uri`` (local lakes: the original file) and are named
``<rank>_<file name>`` so the folder lists in cluster order and two originals with the same name
do not collide. The target folder must be absent or empty: nothing is overwritten.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import BadInput, NotFound, Unsupported

__all__ = ["export_cluster", "export_bucket", "export_images"]

_CLUSTER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


def export_images(lake: Lake, image_ids: list[str], to: str) -> dict:
    """Symlink each image's original into ``to`` (created); returns ``links`` and ``to``.

    Raises:
        BadInput: ``to`` exists and is not an empty folder.
    """
    target = Path(to).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BadInput(f"{target} exists and is not an empty folder; export into a new folder")
    images = open_table(lake, "images")
    con = duckdb.connect()
    try:
        con.register("images", images.to_pyarrow_dataset())
        con.register("wanted", pa.table({"image_id": image_ids, "rank": list(range(len(image_ids)))}))
        rows = con.sql("SELECT w.rank, i.uri FROM wanted w JOIN images i USING (image_id) ORDER BY 1").fetchall()
    finally:
        con.close()
    target.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(rows))))
    for rank, uri in rows:
        source = uri[len("file://"):] if uri.startswith("file://") else uri
        os.symlink(source, target / f"{rank:0{width}d}_{os.path.basename(source) or 'image'}")
    return {"links": len(rows), "to": str(target)}


def export_cluster(lake: Lake, cluster_id: str, to: str) -> dict:
    """Export the members of ``cluster_id`` (most similar first).

    Raises:
        BadInput: a malformed id or a bad target. NotFound: no such cluster.
    """
    if not _CLUSTER_ID.fullmatch(cluster_id or ""):
        raise BadInput(f"malformed cluster id {cluster_id!r}; see the clusters table or GET /api/v1/clusters")
    clusters = open_table(lake, "clusters")
    ids: list[str] = []
    if clusters.file_uris():
        con = duckdb.connect()
        try:
            con.register("clusters", clusters.to_pyarrow_dataset())
            ids = [r[0] for r in con.sql("SELECT image_id FROM clusters WHERE cluster_id = $c GROUP BY 1 "
                                         "ORDER BY max(score) DESC, 1", params={"c": cluster_id}).fetchall()]
        finally:
            con.close()
    if not ids:
        raise NotFound(f"no cluster {cluster_id!r}; see the clusters table or GET /api/v1/clusters")
    return export_images(lake, ids, to)


def export_bucket(lake: Lake, bucket_id: str, to: str) -> dict:
    """Export a bucket's images, once ``lake.buckets.bucket_members(lake, bucket_id)`` exists.

    Raises:
        Unsupported: buckets are not available in this build yet.
    """
    try:
        from lake.buckets import bucket_members  # type: ignore[import-not-found]
    except ImportError:
        raise Unsupported("export --bucket is not available yet: this build has no buckets; "
                          "use export --cluster ID") from None
    return export_images(lake, list(bucket_members(lake, bucket_id)), to)
