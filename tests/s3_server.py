"""A real S3 server on loopback for the tests: moto's ``ThreadedMotoServer`` in its own process.

Why a child process and not a thread in the test process: the server is Python, so in-process it
would compete with the code under test for the GIL (and multiprocessing children could not reach
a server that lives in a forked copy); and the test suite turns warnings into errors, which must
not break the server's own request handling. The child prints ``PORT <n>`` once listening and stops
when its stdin closes (so it never outlives the test session, even after a crash).

Use it from tests with the fixtures below (``from s3_server import s3_server, s3_lake  # noqa``),
or by hand: ``python tests/s3_server.py`` prints the port and serves until Ctrl-D.

``auth=True`` starts a server that checks signatures (moto's IAM emulation with no users), for
the wrong-credentials test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid

import pytest

__all__ = ["S3Server", "s3_server", "s3_lake", "lake_root"]


class S3Server:
    def __init__(self, auth: bool = False):
        env = dict(os.environ)
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the moto S3 server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def make_bucket(self, name: str | None = None) -> str:
        """A new empty bucket (path-style PUT; moto accepts it unsigned unless ``auth``)."""
        name = name or f"t-{uuid.uuid4().hex[:20]}"
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b"")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status
        return name

    def storage_options(self) -> dict[str, str]:
        """The options for deltalake and :class:`lake.store.LakeStore` alike (deltalake's spelling)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
                "AWS_CONDITIONAL_PUT": "etag"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_lake(s3_server, monkeypatch):
    """``s3://<fresh bucket>/lake`` with the server's settings in the environment (as on a real node:
    deltalake, obstore and spawned child processes all read them from there)."""
    for k, v in s3_server.storage_options().items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_server.make_bucket()}/lake"


@pytest.fixture(params=["local", "s3"])
def lake_root(request, tmp_path) -> str:
    """A lake root on local disk, then on the S3 server: run the test against both."""
    if request.param == "local":
        return str(tmp_path / "lake")
    return request.getfixturevalue("s3_lake")


def _serve() -> None:
    import logging

    logging.disable(logging.CRITICAL)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()  # until the parent closes stdin or dies
    server.stop()


if __name__ == "__main__":
    if "--serve" in sys.argv:
        _serve()
    else:
        srv = S3Server()
        print(f"S3 endpoint {srv.endpoint}; Ctrl-D stops it", flush=True)
        try:
            sys.stdin.read()
        finally:
            srv.stop()
