"""A local, size-bounded cache of verified lake artifacts, for serving from an object store.

Serving memory-maps index shards, the suggestion matrix and tile packs. On a local lake those are
files already, and :meth:`ArtifactCache.path` returns the lake's own path (no copy, today's
speed). On an object-store lake (``s3://``, ``gs://``, ``az://``) a server worker asks the cache
for an artifact by its key and the checksum its manifest records; the cache returns a local file
to memory-map:

* **Verified.** The object is streamed from the store into a temporary file in the cache while
  its sha256 and size are computed; only a file that matches the manifest is renamed into place.
  A mismatch raises :class:`lake.errors.CorruptArtifact` naming the key and leaves nothing cached.
* **Content-addressed and immutable.** An entry is named by its sha256 (``<dir>/ab/abcdef….bin``),
  so the same bytes are fetched once whatever build or key names them, and an entry never changes.
* **Safe for concurrent workers and processes.** A fetch holds a per-entry ``flock``
  (``<dir>/.locks/<sha>.lock``): a second worker that wants the same entry waits for the first and
  then uses its file instead of downloading it again. The rename into place is atomic, so a
  reader sees the whole file or none (the lock only saves work; correctness is the rename). The
  cache is per node (a local disk), so ``flock`` is fine here: it never coordinates the lake.
* **Size-bounded, least recently used first.** Each use touches the entry's mtime; after a fetch the
  cache removes the least recently used entries until the total is under ``max_bytes``
  (``settings.artifact_cache_mb``), under a cache-wide lock. Entries used in the last
  ``min_age_s`` seconds (default 60) and the one just fetched are kept even above the bound, so an
  artifact being opened is never pulled away; a worker that already memory-mapped an evicted
  file keeps reading it (an unlinked file lives on while it is mapped).

The cache directory is ``settings.artifact_cache_dir``, by default ``$XDG_CACHE_HOME/imagelake``
(``~/.cache/imagelake``) plus ``artifacts``. Nothing in it is needed for correctness: deleting it
(between server starts) only costs the downloads again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from typing import Any

from lake.errors import BadInput, CorruptArtifact
from lake.store import Flock, LakeStore

__all__ = ["ArtifactCache", "default_cache_dir", "artifact_cache"]

log = logging.getLogger("imagelake.artifact_cache")

_SHA = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imagelake", "artifacts")


class ArtifactCache:
    """See the module docstring. Thread- and process-safe; one instance per process is enough."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int = 10 << 30,
                 min_age_s: float = 60.0):
        if max_bytes <= 0:
            raise BadInput(f"artifact cache size must be positive, got {max_bytes} bytes")
        self.directory = os.path.abspath(os.fspath(directory or default_cache_dir()))
        self.max_bytes, self.min_age_s = int(max_bytes), float(min_age_s)
        self._lock = threading.Lock()
        self.fetched = 0      # entries this process downloaded (tests, /health)
        self.hits = 0

    def __repr__(self) -> str:
        return f"ArtifactCache({self.directory!r}, max_bytes={self.max_bytes})"

    # -- the one call ----------------------------------------------------------------------------

    def path(self, store: LakeStore, key: str, *, sha256: str, size: int | None = None) -> str:
        """A local file holding the verified object ``key`` of ``store``.

        Local lakes: the lake's own file (verification stays with the caller, as before).

        Raises:
            CorruptArtifact: the object's sha256 or size differs from ``sha256``/``size`` (nothing cached).
            NotFound: no object ``key``. StoreUnavailable: the store cannot be reached.
        """
        local = store.local_path(key)
        if local is not None:
            return local
        sha256 = (sha256 or "").lower()
        if not _SHA.fullmatch(sha256):
            raise CorruptArtifact(f"artifact {key}: the manifest records no valid sha256 ({sha256!r})")
        final = self._entry(sha256)
        if self._use(final, size):
            return final
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with Flock(self._lock_file(sha256), create=True):
            if self._use(final, size):    # another worker fetched it while we waited
                return final
            self._fetch(store, key, sha256, size, final)
        self.evict(keep=final)
        return final

    def read_bytes(self, store: LakeStore, key: str, *, sha256: str, size: int | None = None) -> bytes:
        """The verified bytes of ``key`` (through the cache on an object store)."""
        with open(self.path(store, key, sha256=sha256, size=size), "rb") as f:
            return f.read()

    # -- internals -------------------------------------------------------------------------------

    def _entry(self, sha256: str) -> str:
        return os.path.join(self.directory, sha256[:2], f"{sha256}.bin")

    def _lock_file(self, sha256: str) -> str:
        folder = os.path.join(self.directory, ".locks")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{sha256}.lock")

    def _use(self, final: str, size: int | None) -> bool:
        try:
            st = os.stat(final)
        except FileNotFoundError:
            return False
        if size is not None and st.st_size != size:
            # an entry is only renamed into place after verification, so this is damage on the
            # node's disk: drop it and fetch again
            log.warning("artifact cache entry %s has %d bytes, expected %d; fetching it again", final,
                        st.st_size, size)
            _unlink(final)
            return False
        try:
            os.utime(final)  # LRU order is mtime
        except FileNotFoundError:
            return False
        with self._lock:
            self.hits += 1
        return True

    def _fetch(self, store: LakeStore, key: str, sha256: str, size: int | None, final: str) -> None:
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{uuid.uuid4().hex}.tmp")
        h, n = hashlib.sha256(), 0
        t0 = time.perf_counter()
        try:
            with open(tmp, "wb") as f:
                for chunk in store.iter_chunks(key):
                    f.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
            if size is not None and n != size:
                raise CorruptArtifact(f"artifact {key} in the lake has {n} bytes, its manifest says {size} "
                                      "(truncated or replaced); rebuild it")
            if h.hexdigest() != sha256:
                raise CorruptArtifact(f"artifact {key} in the lake does not match the sha256 of its manifest "
                                      f"({h.hexdigest()[:12]}… != {sha256[:12]}…); rebuild it")
            os.replace(tmp, final)
        finally:
            _unlink(tmp)
        with self._lock:
            self.fetched += 1
        log.info("artifact cache: fetched %s (%d bytes, %.2f s)", key, n, time.perf_counter() - t0)

    def entries(self) -> list[tuple[str, int, float]]:
        """(path, bytes, mtime) of every entry."""
        out = []
        try:
            subdirs = os.listdir(self.directory)
        except FileNotFoundError:
            return out
        for sub in subdirs:
            if sub.startswith("."):
                continue
            folder = os.path.join(self.directory, sub)
            try:
                names = os.listdir(folder)
            except (NotADirectoryError, FileNotFoundError):
                continue
            for name in names:
                if not name.endswith(".bin") or name.startswith("."):
                    continue
                try:
                    st = os.stat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                out.append((os.path.join(folder, name), st.st_size, st.st_mtime))
        return out

    def size(self) -> int:
        return sum(n for _, n, _ in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the cache is within ``max_bytes`` (never ``keep``,
        nor entries used in the last ``min_age_s``); returns the removed paths."""
        os.makedirs(self.directory, exist_ok=True)
        removed = []
        with Flock(os.path.join(self.directory, ".evict.lock"), create=True):
            entries = sorted(self.entries(), key=lambda e: e[2])
            total = sum(n for _, n, _ in entries)
            now = time.time()
            for path, n, mtime in entries:
                if total <= self.max_bytes:
                    break
                if path == keep or now - mtime < self.min_age_s:
                    continue
                if _unlink(path):
                    total -= n
                    removed.append(path)
            if total > self.max_bytes:
                log.warning("artifact cache %s holds %d bytes, over its bound of %d: the artifacts in use "
                            "need more; raise artifact_cache_mb", self.directory, total, self.max_bytes)
        if removed:
            log.info("artifact cache: evicted %d entries", len(removed))
        return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


_CACHES: dict[tuple[str, int, int], ArtifactCache] = {}
_CACHES_LOCK = threading.Lock()


def artifact_cache(settings: Any = None) -> ArtifactCache:
    """This process's cache for ``settings`` (``artifact_cache_dir``, ``artifact_cache_mb``)."""
    directory = getattr(settings, "artifact_cache_dir", "") or default_cache_dir()
    max_bytes = int(float(getattr(settings, "artifact_cache_mb", 10240)) * 2**20)
    key = (os.path.abspath(directory), max_bytes, os.getpid())
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = ArtifactCache(directory, max_bytes)
        return cache
