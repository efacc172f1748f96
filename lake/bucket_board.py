"""The node's version board: the latest Delta version of the bucket log its writer committed, and
the version it is committing, in 32 bytes of shared memory (``/dev/shm``), and the writer's
counters beside it
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

    def announce(self, version: int) -> None:
        """The node writer is about to create the commit file of ``version`` (written before it):
        a follower that finds a commit file past its fold waits for the writer's push only when the
        writer announced that version; any other commit (another node's, or a follower's writing
        past a hung writer) comes with no push, and is read from the log at once."""
        os.pwrite(self._fd, self._REC.pack(version, (version ^ self._MAGIC) & (2**64 - 1)), self._REC.size)

    def announced(self) -> int | None:
        """The last version the node writer announced; None when none (valid) was."""
        return self._read(self._REC.size)

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
        return self._read(0)

    def _read(self, offset: int) -> int | None:
        data = os.pread(self._fd, self._REC.size, offset)
        if len(data) != self._REC.size:
            return None
        version, check = self._REC.unpack(data)
        return version if check == (version ^ self._MAGIC) & (2**64 - 1) else None
