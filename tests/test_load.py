"""A short load smoke test: the benchmark's request mix against a real ``imagelake serve``.

4 clients for a few seconds over loopback against 2 gunicorn workers: every request in the mix
must be answered with its expected status (no 5xx, no connection errors), and every op with a
``verify`` (curation writes, once they exist) must find its acknowledged writes in the lake.
The full run is ``python tests/bench/bench_load.py`` (16 clients, 60 s).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from conftest import write_images  # noqa: E402
from jobs.pipeline import PipelineRequest, run_pipeline  # noqa: E402
from lake.settings import Settings  # noqa: E402
from lake.tokens import create_token  # noqa: E402
from loadgen import MIX, LoadContext, prepare, run_load, start_server  # noqa: E402


@pytest.fixture
def lake(lake_factory, tmp_path):
    lake = lake_factory()
    write_images(tmp_path / "imgs", 90)
    run_pipeline(lake, Settings(lake=lake.root, runner="local", partition_files=30),
                 PipelineRequest(images=str(tmp_path / "imgs"), collection="smoke"))
    return lake


def test_the_load_mix_runs_without_errors_against_gunicorn(lake, tmp_path):
    token = create_token(lake, "admin", "load smoke")[1]
    from deltalake import DeltaTable

    rows = DeltaTable(lake.table_uri("images")).to_pyarrow_table(columns=["image_id", "collection"])
    ctx = LoadContext(rows.column("image_id").to_pylist(), sorted(set(rows.column("collection").to_pylist())))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(lake.root, port, workers=2, log_path=str(tmp_path / "server.log"), threads=4)
    try:
        prepare(f"http://127.0.0.1:{port}", token, MIX, ctx)
        report = run_load(f"http://127.0.0.1:{port}", token, MIX, ctx, clients=4, seconds=10.0)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert report.error_rate == 0, report.error_samples
    assert set(report.latencies_ms) == {op.name for op in MIX}, "an op of the mix never ran"
    assert report.requests >= 20
    for op in MIX:
        if op.verify is not None:
            op.verify(lake, ctx, report.acked.get(op.name, []))
