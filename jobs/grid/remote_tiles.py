"""Serving a layout's tiles from an object-store lake (what :class:`jobs.grid.tiles.TileSource` does
for a local folder).

The tile artifact has the same keys in the store as on disk (``artifacts/tiles/<layout>/``:
``manifest.json``, ``cells.idx``, ``cells.bin``, ``<level>/<x>_<y>.jpg``). Opening reads the
manifest and fetches ``cells.idx`` and ``cells.bin`` through the node's artifact cache
(:mod:`lake.artifact_cache`, verified against the manifest's sha256 and size) and memory-maps the
pack, so deep tiles are drawn from local bytes. Pre-rendered tiles are read from the store (one
small GET) and kept in a per-process memory LRU; deep tiles drawn on request are kept there too,
and with ``cache`` also written back to the store under ``cache/`` (one PUT), where every other
worker and node finds them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import numpy as np

from jobs.grid.tiles import Pyramid, TileSource
from lake.errors import CorruptArtifact, NotFound

__all__ = ["StoreTileSource"]

log = logging.getLogger("imagelake.grid")


class StoreTileSource(TileSource):
    """A :class:`TileSource` over the tile artifact at ``prefix`` in ``store``. Thread-safe.

    Raises:
        NotFound: no finished build (no manifest). CorruptArtifact: the files do not match it.
        StoreUnavailable: the store cannot be reached.
    """

    def __init__(self, store, prefix: str, artifact_cache, cache: bool = True, memory_bytes: int = 32 << 20):
        self.store, self.prefix, self.cache = store, prefix.strip("/"), cache
        self.folder = store.uri(self.prefix)
        try:
            self.manifest = json.loads(store.read_bytes(f"{self.prefix}/manifest.json"))
        except NotFound:
            raise NotFound("the tiles of this layout are not built (no manifest)") from None
        m = self.manifest
        self.pyramid = Pyramid(m["width"], m["height"], m["cell_px"], m["base_px"], m["tile_size"])
        try:
            idx = artifact_cache.path(store, f"{self.prefix}/cells.idx", sha256=m["cells"]["idx_sha256"])
            self._offsets = np.load(idx)
            if m["cells"]["bytes"]:
                pack = artifact_cache.path(store, f"{self.prefix}/cells.bin", sha256=m["cells"]["bin_sha256"],
                                           size=m["cells"]["bytes"])
                self._pack = np.memmap(pack, np.uint8, "r")
            else:
                self._pack = np.zeros(0, np.uint8)
        except NotFound:
            raise CorruptArtifact(f"the tile artifact {self.prefix} lacks its cell pack") from None
        self._memory: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._memory_bytes, self._memory_max = 0, memory_bytes
        self._lock = threading.Lock()

    def tile_key(self, level: int, tx: int, ty: int) -> str:
        if self.pyramid.prerendered(level):
            return f"{self.prefix}/{level}/{tx}_{ty}.jpg"
        return f"{self.prefix}/cache/{level}/{tx}_{ty}.jpg"

    def tile(self, level: int, tx: int, ty: int) -> bytes:
        """The JPEG of a tile. Raises NotFound outside the pyramid."""
        self.pyramid.tile_box(level, tx, ty)
        with self._lock:
            data = self._memory.get((level, tx, ty))
            if data is not None:
                self._memory.move_to_end((level, tx, ty))
                return data
        key = self.tile_key(level, tx, ty)
        try:
            data = self.store.read_bytes(key)
        except NotFound:
            if self.pyramid.prerendered(level):
                raise CorruptArtifact(f"pre-rendered tile {key} is missing") from None
            data = self.render(level, tx, ty)
            if self.cache:
                try:
                    self.store.write_bytes(key, data)
                except Exception as e:  # a read-only credential: serve it anyway, from memory
                    log.warning("could not keep tile %s in the lake: %s", key, e)
        self._remember((level, tx, ty), data)
        return data

    def _remember(self, key: tuple[int, int, int], data: bytes) -> None:
        with self._lock:
            if key in self._memory or len(data) > self._memory_max // 8:
                return
            self._memory[key] = data
            self._memory_bytes += len(data)
            while self._memory_bytes > self._memory_max and self._memory:
                _, dropped = self._memory.popitem(last=False)
                self._memory_bytes -= len(dropped)
