"""Reading published layouts: metadata, cell ↔ image lookups, overlays and tiles (what the API serves).

A :class:`LayoutStore` belongs to one process (deltalake must not be used across a fork) and keeps
each layout it has opened in memory: the image id of every cell (sorted ids for the reverse
lookup) and its :class:`~jobs.grid.tiles.TileSource`. 1M cells take about 100 MB. Layouts are
immutable once listed, so nothing needs invalidating; only the list of layouts is re-read (at most
every ``refresh_s`` seconds).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow.compute as pc

from jobs.grid.tiles import TileSource
from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import BadInput, NotFound
from lake.store import open_delta, store_errors

__all__ = ["LayoutStore", "LayoutView", "LATEST", "check_layout_id", "missing_layout"]

LATEST = "latest"
_LAYOUT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # no '.': "<id>.dzi" must stay unambiguous


def _open(lake: Lake, name: str):
    """The table for reading: bounded timeouts on an object store (a missing table is created, as before)."""
    from deltalake.exceptions import TableNotFoundError

    try:
        return open_delta(lake, name)
    except TableNotFoundError:
        return open_table(lake, name)


def check_layout_id(layout_id: str) -> str:
    """Raise BadInput unless ``layout_id`` is 1-64 letters, digits, ``_ -`` (not ``latest``)."""
    if not _LAYOUT_ID.fullmatch(layout_id or "") or layout_id == LATEST:
        raise BadInput(f"layout id {layout_id!r} must be 1-64 characters of letters, digits, '_', '-' "
                       f"(starting with a letter or digit) and not {LATEST!r}")
    return layout_id


def missing_layout(layout_id: str) -> NotFound:
    return NotFound(f"no grid layout {layout_id!r}; list them with GET /api/v1/grid or run `imagelake grid`")


@dataclass
class LayoutView:
    meta: dict[str, Any]
    cell_ids: np.ndarray      # object (height*width,): image id per cell, None when empty
    sorted_ids: np.ndarray    # str, ascending
    sorted_cells: np.ndarray  # int64, the cell of sorted_ids[i]
    tiles: TileSource

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def height(self) -> int:
        return int(self.meta["height"])

    def image_at(self, gx: int, gy: int) -> str:
        """Raises NotFound outside the grid or on an empty cell."""
        if not (0 <= gx < self.width and 0 <= gy < self.height):
            raise NotFound(f"cell ({gx}, {gy}) is outside the {self.width}x{self.height} grid")
        image_id = self.cell_ids[gy * self.width + gx]
        if image_id is None:
            raise NotFound(f"cell ({gx}, {gy}) is empty")
        return image_id

    def cells_of(self, image_ids: list[str]) -> tuple[list[dict], list[str]]:
        """(cells of the ids on this layout, ids not on it)."""
        ids = np.asarray(image_ids, dtype=self.sorted_ids.dtype) if image_ids else np.zeros(0, self.sorted_ids.dtype)
        pos = np.searchsorted(self.sorted_ids, ids)
        pos = np.minimum(pos, max(len(self.sorted_ids) - 1, 0))
        found = (self.sorted_ids[pos] == ids) if len(self.sorted_ids) else np.zeros(len(ids), bool)
        cells, missing = [], []
        for i, image_id in enumerate(image_ids):
            if found[i]:
                c = int(self.sorted_cells[pos[i]])
                cells.append({"image_id": image_id, "gx": c % self.width, "gy": c // self.width})
            else:
                missing.append(image_id)
        return cells, missing


class LayoutStore:
    """Published layouts of one lake, for one process. Thread-safe."""

    def __init__(self, lake: Lake, refresh_s: float = 2.0, tile_cache: bool = True, artifact_cache=None):
        self.lake, self.refresh_s, self.tile_cache = lake, refresh_s, tile_cache
        self.artifact_cache = artifact_cache  # object-store lakes: where tile packs are fetched to
        self._lock = threading.Lock()
        self._meta: list[dict[str, Any]] = []
        self._checked_at = float("-inf")
        self._views: dict[str, LayoutView] = {}

    def layouts(self) -> list[dict[str, Any]]:
        """Every published layout's metadata, newest first."""
        with self._lock:
            if time.monotonic() - self._checked_at >= self.refresh_s:
                with store_errors(self.lake):
                    table = _open(self.lake, "grid_layouts")
                    rows = table.to_pyarrow_dataset().to_table().to_pylist() if table.file_uris() else []
                self._meta = sorted(rows, key=lambda r: (r["created_at"], r["layout_id"]), reverse=True)
                self._checked_at = time.monotonic()
            return list(self._meta)

    def resolve(self, layout_id: str) -> dict[str, Any]:
        """Metadata of ``layout_id`` (``latest``: the newest). Raises NotFound."""
        metas = self.layouts()
        if layout_id == LATEST:
            if not metas:
                raise NotFound("no grid layout yet; run `imagelake grid`")
            return metas[0]
        for m in metas:
            if m["layout_id"] == layout_id:
                return m
        raise missing_layout(layout_id)

    def view(self, layout_id: str) -> LayoutView:
        meta = self.resolve(layout_id)
        lid = meta["layout_id"]
        with self._lock:
            view = self._views.get(lid)
        if view is None:
            view = self._open(meta)
            with self._lock:
                view = self._views.setdefault(lid, view)
        return view

    def _open(self, meta: dict[str, Any]) -> LayoutView:
        with store_errors(self.lake):
            grid = _open(self.lake, "grid").to_pyarrow_dataset()
            con = duckdb.connect()
            try:
                con.register("grid", grid)
                rows = con.sql("SELECT image_id, gy::BIGINT * $w + gx AS cell FROM grid WHERE layout_id = $id "
                               "ORDER BY image_id", params={"w": meta["width"], "id": meta["layout_id"]}).to_arrow_table()
            finally:
                con.close()
        n_cells = int(meta["width"]) * int(meta["height"])
        cells = rows.column("cell").to_numpy().astype(np.int64)
        ids = np.asarray(rows.column("image_id").to_pylist())
        cell_ids = np.full(n_cells, None, dtype=object)
        cell_ids[cells] = ids
        if self.lake.is_local:
            tiles = TileSource(self.lake.path(meta["tiles_path"]), cache=self.tile_cache)
        else:
            from jobs.grid.remote_tiles import StoreTileSource
            from lake.artifact_cache import artifact_cache
            from lake.store import LakeStore

            with store_errors(self.lake):
                tiles = StoreTileSource(LakeStore.for_lake(self.lake), meta["tiles_path"],
                                        self.artifact_cache or artifact_cache(), cache=self.tile_cache)
        return LayoutView(meta, cell_ids, ids, cells, tiles)

    def tag_image_ids(self, tag: str) -> list[str]:
        """Image ids carrying ``tag`` (any source). Raises BadInput on an empty tag."""
        if not tag or len(tag) > 200:
            raise BadInput("tag must be 1-200 characters")
        with store_errors(self.lake):
            table = _open(self.lake, "tags")
            if not table.file_uris():
                return []
            rows = table.to_pyarrow_dataset().to_table(columns=["image_id"], filter=pc.field("tag") == tag)
        return sorted(set(rows.column("image_id").to_pylist()))
