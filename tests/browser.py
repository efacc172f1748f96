"""Helpers for tests that drive a real server: free ports, `imagelake serve` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(lake_root: str, *, workers: int = 2, extra: tuple[str, ...] = (),
                   env_extra: dict[str, str] | None = None, tree: Path = REPO) -> Iterator[str]:
    """``imagelake serve`` on a free loopback port; yields its base URL and stops it afterwards.
    ``tree``: the source tree the server runs from (a bench's older checkout as its baseline)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree), **(env_extra or {}))
    server = subprocess.Popen([sys.executable, "-m", "imagelake", "--lake", lake_root, *extra, "serve",
                               "--port", str(port), "--workers", str(workers)],
                              cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError("server exited: " + server.stderr.read())
            try:
                if requests.get(f"{base}/api/v1/health", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not answer within 60 s")
            time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
