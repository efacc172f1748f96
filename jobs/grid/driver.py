"""The grid job: lay out (a subset of) the collection on a grid, render its tiles, publish it.

Order of writes, so that readers never see half a layout: ``grid`` rows (once per run id), then the
tile artifact in ``artifacts/tiles/<layout_id>/`` (manifest last), then the ``grid_layouts`` row
that lists it. A crash leaves grid rows and a folder nobody lists; re-running makes a new layout.

A run is incremental when it can be (:mod:`jobs.grid.incremental`): the images added since the
newest matching layout go into its free cells, everything else keeps its cell, and only the
changed cells are drawn again; a full layout happens when they do not fit, or with ``full``.

The layout is one global computation on the driver (see :mod:`jobs.grid.layout`: ~1M images in
minutes on 2 cores); Spark would add a shuffle and nothing else. The tile pass is one sequential
read of the 64 px thumbnails in cell order (DuckDB join + sort, streamed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from jobs.grid.incremental import LayoutState, load_state, place_new, save_state, update_tiles
from jobs.grid.layout import LayoutParams, layout_grid, project
from jobs.grid.quality import neighbourhood_preservation, random_baseline
from jobs.grid.store import check_layout_id
from jobs.grid.tiles import Pyramid, build_tiles, publish_tiles
from jobs.grid.where import select_seqs
from jobs.runs import job_run
from lake.catalog import Lake
from lake.commit import commit_rows, now_utc, open_table
from lake.errors import BadInput, Conflict
from lake.settings import Settings
from lake.vectors import default_model_key, load_embeddings, load_few_embeddings

__all__ = ["run_grid", "grid_line", "METHOD"]

METHOD = "pca-balanced-split+flas-blocks"


def _existing_layouts(lake: Lake) -> set[str]:
    table = open_table(lake, "grid_layouts")
    if not table.file_uris():
        return set()
    return set(table.to_pyarrow_dataset().to_table(columns=["layout_id"]).column(0).to_pylist())


def run_grid(lake: Lake, settings: Settings, *, where: str | None = None, seed: int = 0,
             layout_id: str | None = None, model: str | None = None,
             params: LayoutParams | None = None, full: bool = False) -> dict[str, Any]:
    """Lay out the images that have features (those matching ``where``), write rows, tiles, metadata.

    Incremental by default: when the newest layout of the same model, ``where``, seed and params
    keeps its state (:mod:`jobs.grid.incremental`) and the images added since fit into its free
    cells, they are placed there and its other cells are kept; otherwise (or with ``full``) all
    images are laid out anew, with ``grid_spare_fraction`` extra free cells.

    Args:
        where: a predicate over ``images`` columns (validated, see :mod:`jobs.grid.where`).
        seed: same inputs and seed → same full layout.
        layout_id: the new layout's id (default: the run id).
        full: lay everything out anew even when new images would fit.
    Returns:
        A summary: layout_id, n, width, height, quality, random_quality, seconds, tile bytes,
        ``mode`` (``full``, ``placed`` or ``unchanged``: nothing new, the newest layout stays).
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
    args = {"where": where, "seed": seed, "layout_id": layout_id, "model": model, "full": full}
    with job_run(lake, "grid", args, settings=settings) as run:
        t_all = time.perf_counter()
        key = model or default_model_key(lake)
        base = None if full else _base_layout(lake, settings, key, where, seed, params)
        summary = None
        if base is not None:
            summary = _place_into(lake, settings, run, base, layout_id, key, seqs, params)
        if summary is None:
            summary = _full_layout(lake, settings, run, layout_id or run.run_id, key, seqs, where, seed, params)
        summary["seconds"] = round(time.perf_counter() - t_all, 3)
        run.metrics.update(summary)
    return summary


def _full_layout(lake: Lake, settings: Settings, run, layout_id: str, key: str, seqs, where: str | None,
                 seed: int, params: LayoutParams) -> dict[str, Any]:
    emb = load_embeddings(lake, key, seqs=seqs)
    if len(emb) == 0:
        what = f"--where {where!r} selects no image" if where is not None else "no image has"
        raise BadInput(f"{what} with features of {emb.model}; nothing to lay out")
    run.rows_in = len(emb)
    t0 = time.perf_counter()
    layout = layout_grid(emb.vectors, seed=seed, params=params, spare=settings.grid_spare_fraction)
    layout_s = time.perf_counter() - t0
    sample = min(settings.grid_quality_sample, len(emb))
    t0 = time.perf_counter()
    quality = (neighbourhood_preservation(emb.vectors, layout.cells, layout.width, layout.height,
                                          sample=sample, seed=seed) if sample else float("nan"))
    quality_s = time.perf_counter() - t0
    created = now_utc()
    rows = _grid_rows(layout_id, emb.image_ids, layout.xy, layout.gx, layout.gy, created)
    commit_rows(lake, "grid", rows, run_id=run.run_id)
    t0 = time.perf_counter()
    pyramid = Pyramid(layout.width, layout.height, cell_px=min(settings.thumbnail_sizes))
    thumbs = _thumbnails_in_cell_order(lake, emb.image_ids, layout.cells, pyramid.cell_px)
    meta = {"layout_id": layout_id, "run_id": run.run_id, "features_version": emb.features_version}
    keep = lake.is_local and settings.grid_spare_fraction > 0
    if lake.is_local:
        folder = lake.artifacts_dir("tiles", layout_id)
        if keep:   # the state first: a folder is listed only once its manifest (written last) exists
            os.makedirs(folder, exist_ok=True)
            save_state(folder, _state_of(layout, emb.seqs))
        manifest = build_tiles(folder, pyramid, thumbs, meta=meta, keep_mosaic=keep)
    else:  # built on local disk, then copied into the object store (manifest last)
        from lake.store import LakeStore

        with tempfile.TemporaryDirectory(prefix="imagelake-tiles-") as tmp:
            manifest = build_tiles(tmp, pyramid, thumbs, meta=meta)
            publish_tiles(tmp, LakeStore.for_lake(lake), f"artifacts/tiles/{layout_id}")
    tiles_s = time.perf_counter() - t0
    layout_params = {**dataclasses.asdict(params), "spare_fraction": settings.grid_spare_fraction}
    _publish(lake, run, layout_id, emb.model, where, seed, len(emb), layout.width, layout.height,
             None if sample == 0 else quality, sample, emb.features_version, layout_params, created)
    run.rows_out = len(emb)
    return {
        "layout_id": layout_id, "run_id": run.run_id, "model": emb.model, "mode": "full", "n": len(emb),
        "placed": len(emb), "width": layout.width, "height": layout.height, "quality": quality,
        "quality_sample": sample, "random_quality": random_baseline(len(emb)), "layout_s": round(layout_s, 3),
        "quality_s": round(quality_s, 3), "tiles_s": round(tiles_s, 3),
        "prerendered_tile_bytes": manifest["prerendered_tile_bytes"],
        "cells_bytes": manifest["cells"]["bytes"],
        **{k: round(v, 3) for k, v in layout.timings.items()},
    }


def _state_of(layout, seqs: np.ndarray) -> LayoutState:
    n_cells = layout.width * layout.height
    cell_seq = np.full(n_cells, -1, np.int64)
    cell_seq[layout.cells] = seqs
    cell_z = np.zeros((n_cells, layout.z.shape[1]), np.float16)
    cell_z[layout.cells] = layout.z
    return LayoutState(layout.width, layout.height, layout.mean, layout.basis, cell_seq, cell_z)


def _publish(lake: Lake, run, layout_id: str, model: str, where: str | None, seed: int, n: int, width: int,
             height: int, quality: float | None, sample: int, features_version: int, params: dict, created) -> None:
    commit_rows(lake, "grid_layouts", [{
        "layout_id": layout_id, "model": model, "where_sql": where, "seed": seed, "n": n,
        "width": width, "height": height, "method": METHOD, "quality": quality, "quality_sample": sample,
        "features_version": features_version, "tiles_path": f"artifacts/tiles/{layout_id}",
        "params": json.dumps(params), "run_id": run.run_id, "created_at": created,
    }], run_id=run.run_id)


def _grid_rows(layout_id: str, image_ids: list[str], xy: np.ndarray, gx: np.ndarray, gy: np.ndarray,
               created) -> pa.Table:
    n = len(image_ids)
    return pa.table({
        "layout_id": pa.array([layout_id] * n, pa.string()),
        "image_id": pa.array(image_ids, pa.string()),
        "x": pa.array(xy[:, 0], pa.float32()), "y": pa.array(xy[:, 1], pa.float32()),
        "gx": pa.array(gx, pa.int32()), "gy": pa.array(gy, pa.int32()),
        "created_at": pa.array([created] * n, pa.timestamp("us", tz="UTC")),
    })


def _base_layout(lake: Lake, settings: Settings, key: str, where: str | None, seed: int,
                 params: LayoutParams) -> dict[str, Any] | None:
    """The newest layout new images may be placed into: same model, ``where``, seed and params, on a
    local lake, made with spare cells. None: lay out anew."""
    if not lake.is_local or settings.grid_spare_fraction <= 0:
        return None
    table = open_table(lake, "grid_layouts")
    if not table.file_uris():
        return None
    wanted = dataclasses.asdict(params)
    for row in sorted(table.to_pyarrow_dataset().to_table().to_pylist(),
                      key=lambda r: (r["created_at"], r["layout_id"]), reverse=True):
        try:
            kept = json.loads(row["params"] or "{}")
        except ValueError:
            continue
        if (row["model"], row["where_sql"], row["seed"]) == (key, where, seed) and "spare_fraction" in kept \
                and {k: kept.get(k) for k in wanted} == wanted:
            return row
    return None


def _place_into(lake: Lake, settings: Settings, run, base: dict[str, Any], layout_id: str | None, key: str,
                seqs, params: LayoutParams) -> dict[str, Any] | None:
    """New images into ``base``'s free cells (see :mod:`jobs.grid.incremental`); None when they do
    not fit or the base keeps no state (the caller lays out anew)."""
    base_folder = lake.path(base["tiles_path"])
    state = load_state(base_folder)
    if state is None:
        return None
    selected = _selected_seqs(lake, key, seqs)
    used = state.cell_seq >= 0
    new = np.setdiff1d(selected, state.cell_seq[used])
    gone = np.flatnonzero(used & ~np.isin(state.cell_seq, selected))
    if len(new) > state.free + len(gone) or len(selected) == 0:
        run.metrics["relayout"] = f"{len(new)} new images, {state.free + len(gone)} free cells in {base['layout_id']}"
        return None
    summary = {"run_id": run.run_id, "model": key, "n": len(selected), "width": state.width,
               "height": state.height, "quality": base["quality"], "quality_sample": base["quality_sample"],
               "random_quality": random_baseline(len(selected)), "base_layout_id": base["layout_id"],
               "placed": len(new), "removed": len(gone), "layout_s": 0.0, "quality_s": 0.0, "tiles_s": 0.0}
    if len(new) == 0 and len(gone) == 0 and layout_id is None:
        run.rows_in = run.rows_out = 0
        return {**summary, "layout_id": base["layout_id"], "mode": "unchanged", "free_cells": state.free}
    layout_id = layout_id or run.run_id
    emb = load_few_embeddings(lake, key, new)
    if len(emb) and emb.vectors.shape[1] != len(state.mean):
        return None
    run.rows_in = summary["placed"] = len(emb)
    t0 = time.perf_counter()
    state.cell_seq[gone] = -1
    state.cell_z[gone] = 0
    z_new = project(emb.vectors, state.mean, state.basis) if len(emb) else np.zeros((0, state.basis.shape[1]), np.float32)
    cells = place_new(state, z_new)
    state.cell_seq[cells] = emb.seqs
    state.cell_z[cells] = z_new
    layout_s = time.perf_counter() - t0
    created = now_utc()
    kept = _base_rows(lake, base["layout_id"], state.width, gone)
    rows = pa.concat_tables([
        _grid_rows(layout_id, kept.column("image_id").to_pylist(), np.c_[kept.column("x"), kept.column("y")],
                   kept.column("gx").to_numpy(), kept.column("gy").to_numpy(), created),
        _grid_rows(layout_id, emb.image_ids, z_new[:, :2], cells % state.width, cells // state.width, created)])
    commit_rows(lake, "grid", rows, run_id=run.run_id)
    t0 = time.perf_counter()
    pyramid = Pyramid(state.width, state.height, cell_px=min(settings.thumbnail_sizes))
    added = {int(c): None for c in cells}
    for batch_cells, jpegs in _thumbnails_in_cell_order(lake, emb.image_ids, cells, pyramid.cell_px):
        added.update(zip(batch_cells.tolist(), jpegs))
    folder = lake.artifacts_dir("tiles", layout_id)
    os.makedirs(folder, exist_ok=True)
    save_state(folder, state)
    meta = {"layout_id": layout_id, "run_id": run.run_id, "features_version": emb.features_version,
            "base_layout_id": base["layout_id"]}
    try:
        manifest = update_tiles(base_folder, folder, pyramid, added, gone, meta)
    except FileNotFoundError:
        return None
    tiles_s = time.perf_counter() - t0
    layout_params = {**json.loads(base["params"]), "placed_into": base["layout_id"], "placed": len(new)}
    _publish(lake, run, layout_id, key, base["where_sql"], base["seed"], len(selected), state.width,
             state.height, base["quality"], base["quality_sample"], emb.features_version, layout_params, created)
    run.rows_out = len(emb)
    return {**summary, "layout_id": layout_id, "mode": "placed", "free_cells": state.free,
            "layout_s": round(layout_s, 3), "tiles_s": round(tiles_s, 3),
            "prerendered_tile_bytes": manifest["prerendered_tile_bytes"], "cells_bytes": manifest["cells"]["bytes"]}


def _selected_seqs(lake: Lake, key: str, seqs) -> np.ndarray:
    """Sorted seqs of the images with features of ``key`` (among ``seqs`` when given), no vectors read."""
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        con.register("features", open_table(lake, "features").to_pyarrow_dataset())
        con.register("images", open_table(lake, "images").to_pyarrow_dataset())
        sql = "SELECT DISTINCT i.seq FROM features f JOIN images i USING (image_id) WHERE f.model = $k"
        if seqs is not None:
            con.register("wanted", pa.table({"seq": pa.array(np.asarray(seqs, np.int64))}))
            sql += " AND i.seq IN (SELECT seq FROM wanted)"
        got = con.sql(sql + " ORDER BY 1", params={"k": key}).to_arrow_table()
    finally:
        con.close()
    return got.column(0).to_numpy().astype(np.int64)


def _base_rows(lake: Lake, layout_id: str, width: int, gone: np.ndarray) -> pa.Table:
    """The base layout's grid rows but those of ``gone`` cells."""
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        con.register("grid", open_table(lake, "grid").to_pyarrow_dataset())
        con.register("gone", pa.table({"cell": pa.array(np.asarray(gone, np.int64))}))
        return con.sql("SELECT image_id, x, y, gx, gy FROM grid WHERE layout_id = $id AND "
                       "gy::BIGINT * $w + gx NOT IN (SELECT cell FROM gone) ORDER BY gy, gx",
                       params={"id": layout_id, "w": width}).to_arrow_table()
    finally:
        con.close()


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
                   "(SELECT image_id, any_value(jpeg) AS jpeg FROM thumbnails WHERE size = $size "
                   "AND image_id IN (SELECT image_id FROM layout_cells) GROUP BY 1) t "
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
    if s.get("mode") == "unchanged":
        return (f"grid {s['layout_id']}: up to date ({s['n']} images, {s['free_cells']} free cells); "
                f"total {s['seconds']:.1f} s")
    q = "not scored" if not s["quality_sample"] else (
        f"quality {s['quality']:.3f} (neighbourhood preservation on {s['quality_sample']} cells"
        + ("" if s.get("mode") != "placed" else f", of {s['base_layout_id']}")
        + f"; random ≈ {s['random_quality']:.3f})")
    how = "" if s.get("mode") != "placed" else (
        f"; {s['placed']} new images placed into free cells of {s['base_layout_id']}, "
        f"{s['removed']} removed, {s['free_cells']} cells free")
    return (f"grid {s['layout_id']}: {s['n']} images on {s['width']}x{s['height']} cells, {q}{how}; "
            f"layout {s['layout_s']:.1f} s, tiles {s['tiles_s']:.1f} s, total {s['seconds']:.1f} s")
