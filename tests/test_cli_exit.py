"""Every read-only command exits with its documented code, run after run (issue 15 item 6: Arrow
workers dropping deltalake's Python filesystem during interpreter finalization aborted with 134)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [["status"], ["status", "--format", "json"], ["token", "list"], ["settings"],
            ["sql", "select 1"], ["metadata", "columns"]]


def _cli(lake, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "imagelake", "--lake", str(lake), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300).returncode


def test_read_only_commands_exit_zero_every_time(tmp_path):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(images / f"{i}.png")
    lake = tmp_path / "lake"
    assert _cli(lake, "--runner", "local", "ingest", "--images", str(images)) == 0
    assert _cli(lake, "token", "create", "--scope", "read") == 0
    runs = [c for c in COMMANDS for _ in range(6)]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda c: _cli(lake, *c), runs))
    bad = [(" ".join(c), code) for c, code in zip(runs, codes) if code != 0]
    assert bad == []
