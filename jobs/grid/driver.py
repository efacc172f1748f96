"""The grid job: lay out (a subset of) the collection on a grid, render its tiles, publish it.

Order of writes, so that readers never see half a layout: ``grid`` rows (once per run id), then the
tile artifact in ``artifacts/tiles/<layout_id>/`` (manifest last), then the ``grid_layouts`` row
that lists it. A crash leaves grid rows and a folder nobody lists; re-running makes a new layout.

The layout is one global computation on the driver (see :mod:`jobs.grid.layout`: ~1M images in
minutes on 2 cores); Spark would add a shuffle and nothing else. The tile pass is one sequential
read of the 64 px thumbnails in cell order (DuckDB join + sort, streamed).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from typing import Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from jobs.grid.layout import LayoutParams, layout_grid
from jobs.grid.quality import neighbourhood_preservation, random_baseline
from jobs.grid.store import check_layout_id
from jobs.grid.tiles import Pyramid, build_tiles, publish_tiles
from jobs.grid.where import select_seqs
from jobs.runs import job_run
from lake.catalog import Lake
from lake.commit import commit_rows, now_utc, open_table
from lake.errors import BadInput, Conflict
from lake.settings import Settings
from lake.vectors import load_embeddings

__all__ = ["run_grid", "grid_line", "METHOD"]

METHOD = "pca-balanced-split+flas-blocks"


def _existing_layouts(lake: Lake) -> set[str]:
    table = open_table(lake, "grid_layouts")
    if not table.file_uris():
        return set()
    return set(table.to_pyarrow_dataset().to_table(columns=["layout_id"]).column(0).to_pylist())


def run_grid(lake: Lake, settings: Settings, *, where: str | None = None, seed: int = 0,
             layout_id: str | None = None, model: str | None = None,
             params: LayoutParams | None = None) -> dict[str, Any]:
    """Lay out the images that have features (those matching ``where``), write rows, tiles, metadata.

    Args:
        where: a predicate over ``images`` columns (validated, see :mod:`jobs.grid.where`).
        seed: same inputs and seed → same layout.
        layout_id: the new layout's id (default: the run id).
    Returns:
        A summary: layout_id, n, width, height, quality, random_quality, seconds, tile bytes.
    Raises:
        BadInput: a bad ``where`` or layout id, or nothing selected. Conflict: the id exists.
        NotFound: no features in the lake.
    """
    params = params or LayoutParams()
    lake.ensure()
    if layout_id is not None:
        check_layout_id(layout_id)
        if layout_id in _existing_layouts(lake):
            raise Conflict(f"layout {layout_id!r} exists already; choose another --layout-id")
    seqs = select_seqs(lake, where, timeout_s=settings.sql_timeout_s) if where is not None else None
    args = {"where": where, "seed": seed, "layout_id": layout_id, "model": model}
    with job_run(lake, "grid", args, settings=settings) as run:
        layout_id = layout_id or run.run_id
        t_all = time.perf_counter()
        emb = load_embeddings(lake, model, seqs=seqs)
        if len(emb) == 0:
            what = f"--where {where!r} selects no image" if where is not None else "no image has"
            raise BadInput(f"{what} with features of {emb.model}; nothing to lay out")
        run.rows_in = len(emb)
        t0 = time.perf_counter()
        layout = layout_grid(emb.vectors, seed=seed, params=params)
        layout_s = time.perf_counter() - t0
        sample = min(settings.grid_quality_sample, len(emb))
        t0 = time.perf_counter()
        quality = (neighbourhood_preservation(emb.vectors, layout.cells, layout.width, layout.height,
                                              sample=sample, seed=seed) if sample else float("nan"))
        quality_s = time.perf_counter() - t0
        created = now_utc()
        rows = pa.table({
            "layout_id": pa.array([layout_id] * len(emb), pa.string()),
            "image_id": pa.array(emb.image_ids, pa.string()),
            "x": pa.array(layout.xy[:, 0], pa.float32()), "y": pa.array(layout.xy[:, 1], pa.float32()),
            "gx": pa.array(layout.gx, pa.int32()), "gy": pa.array(layout.gy, pa.int32()),
            "created_at": pa.array([created] * len(emb), pa.timestamp("us", tz="UTC")),
        })
        commit_rows(lake, "grid", rows, run_id=run.run_id)
        t0 = time.perf_counter()
        pyramid = Pyramid(layout.width, layout.height, cell_px=min(settings.thumbnail_sizes))
        thumbs = _thumbnails_in_cell_order(lake, emb.image_ids, layout.cells, pyramid.cell_px)
        meta = {"layout_id": layout_id, "run_id": run.run_id, "features_version": emb.features_version}
        if lake.is_local:
            manifest = build_tiles(lake.artifacts_dir("tiles", layout_id), pyramid, thumbs, meta=meta)
        else:  # built on local disk, then copied into the object store (manifest last)
            from lake.store import LakeStore

            with tempfile.TemporaryDirectory(prefix="imagelake-tiles-") as tmp:
                manifest = build_tiles(tmp, pyramid, thumbs, meta=meta)
                publish_tiles(tmp, LakeStore.for_lake(lake), f"artifacts/tiles/{layout_id}")
        tiles_s = time.perf_counter() - t0
        commit_rows(lake, "grid_layouts", [{
            "layout_id": layout_id, "model": emb.model, "where_sql": where, "seed": seed, "n": len(emb),
            "width": layout.width, "height": layout.height, "method": METHOD,
            "quality": None if sample == 0 else quality, "quality_sample": sample,
            "features_version": emb.features_version, "tiles_path": f"artifacts/tiles/{layout_id}",
            "params": json.dumps(dataclasses.asdict(params)), "run_id": run.run_id, "created_at": created,
        }], run_id=run.run_id)
        run.rows_out = len(emb)
        summary = {
            "layout_id": layout_id, "run_id": run.run_id, "model": emb.model, "n": len(emb),
            "width": layout.width, "height": layout.height, "quality": quality, "quality_sample": sample,
            "random_quality": random_baseline(len(emb)), "layout_s": round(layout_s, 3),
            "quality_s": round(quality_s, 3), "tiles_s": round(tiles_s, 3),
            "prerendered_tile_bytes": manifest["prerendered_tile_bytes"],
            "cells_bytes": manifest["cells"]["bytes"], "seconds": round(time.perf_counter() - t_all, 3),
            **{k: round(v, 3) for k, v in layout.timings.items()},
        }
        run.metrics.update(summary)
    return summary


def _thumbnails_in_cell_order(lake: Lake, image_ids: list[str], cells: np.ndarray,
                              size: int) -> Iterator[tuple[np.ndarray, list]]:
    """(cells, jpegs) batches sorted by cell: one streamed DuckDB join of the layout and thumbnails."""
    thumbs = open_table(lake, "thumbnails")
    order = pa.table({"image_id": pa.array(image_ids, pa.string()), "cell": pa.array(cells, pa.int64())})
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        con.register("layout_cells", order)
        if thumbs.file_uris():
            con.register("thumbnails", thumbs.to_pyarrow_dataset())
            sql = ("SELECT c.cell, t.jpeg FROM layout_cells c LEFT JOIN "
                   "(SELECT image_id, any_value(jpeg) AS jpeg FROM thumbnails WHERE size = $size GROUP BY 1) t "
                   "USING (image_id) ORDER BY c.cell")
            reader = con.sql(sql, params={"size": size}).to_arrow_reader(8192)
        else:
            reader = con.sql("SELECT cell, NULL::BLOB AS jpeg FROM layout_cells ORDER BY cell").to_arrow_reader(8192)
        for batch in reader:
            yield batch.column(0).to_numpy(), batch.column(1).to_pylist()
    finally:
        con.close()


def grid_line(s: dict[str, Any]) -> str:
    """The CLI's summary of a run."""
    q = "not scored" if s["quality_sample"] == 0 else (
        f"quality {s['quality']:.3f} (neighbourhood preservation on {s['quality_sample']} cells; "
        f"random ≈ {s['random_quality']:.3f})")
    return (f"grid {s['layout_id']}: {s['n']} images on {s['width']}x{s['height']} cells, {q}; "
            f"layout {s['layout_s']:.1f} s, tiles {s['tiles_s']:.1f} s, total {s['seconds']:.1f} s")
