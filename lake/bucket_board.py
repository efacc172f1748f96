"""The node's version board: the latest Delta version of the bucket log its writer committed, in 16
bytes of shared memory (``/dev/shm``), and the writer's counters beside it
(:mod:`lake.bucket_writer` explains how reads use it)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = ["VersionBoard"]


class VersionBoard:
    """The latest Delta version of the bucket log the node's writer has committed or read, in a
    small shared file (tmpfs), so every worker can tell in a microsecond whether it is behind."""

    _MAGIC = 0x5EED_B0A2_D0C0_FFEE
    _REC = struct.Struct("<qQ")

    def __init__(self, name: str):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        import tempfile

        self.path = os.path.join(folder or tempfile.gettempdir(), name.lstrip("\0") + ".version")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def publish(self, version: int) -> None:
        os.pwrite(self._fd, self._REC.pack(version, (version ^ self._MAGIC) & (2**64 - 1)), 0)

    @property
    def stats_path(self) -> str:
        return self.path[: -len(".version")] + ".stats.json"

    def publish_stats(self, stats: dict[str, Any]) -> None:
        """The writer's counters (:class:`lake.bucket_store.WriterStats`) for ``read_stats``."""
        tmp = f"{self.stats_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(stats, f)
            os.replace(tmp, self.stats_path)
        except OSError:  # counters only: never fail a commit over them
            pass

    def read_stats(self) -> dict[str, Any] | None:
        """The node writer's latest counters, or None when none were published."""
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def read(self) -> int | None:
        """The published version; None when nothing (valid) is published yet."""
        data = os.pread(self._fd, self._REC.size, 0)
        if len(data) != self._REC.size:
            return None
        version, check = self._REC.unpack(data)
        return version if check == (version ^ self._MAGIC) & (2**64 - 1) else None
