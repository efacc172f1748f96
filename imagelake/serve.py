"""``imagelake serve``: the API and dashboard under gunicorn (threaded workers, no preload).

The workers are gthread with the time a client may take to send its request line and headers
bounded (:mod:`imagelake.worker`); bodies and slow readers are the reverse proxy's to bound.

Each worker builds its own app after the fork — deltalake's runtime must not be forked — so
there is deliberately no ``--preload``; instead each worker warms itself up after the fork
(:func:`api.warm_up`), so the first requests do not wait for the thumbnail index or the suggestion
matrix.
"""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from imagelake.worker import BoundedThreadWorker
from lake.settings import Settings

__all__ = ["serve", "ImagelakeServer"]


class ImagelakeServer(BaseApplication):
    def __init__(self, settings: Settings):
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        for key, value in {
            "bind": f"{s.host}:{s.port}", "workers": s.workers, "threads": s.threads,
            "worker_class": BoundedThreadWorker, "timeout": 120, "graceful_timeout": 20,
            # a connection silent for this long is closed (new, or kept alive between requests)
            "keepalive": 5, "worker_connections": 1000,
            "limit_request_line": 8190, "limit_request_fields": 100, "limit_request_field_size": 8190,
            "preload_app": False, "accesslog": None, "errorlog": "-", "loglevel": s.log_level.lower(),
            "proc_name": "imagelake", "post_worker_init": _warm_worker,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        from dashboards import create_app

        return create_app(self.settings)


def _warm_worker(worker) -> None:
    """In each worker, after the fork: load the lake's views and indexes in the background."""
    from api import warm_up

    warm_up(worker.wsgi)


def serve(settings: Settings) -> None:
    ImagelakeServer(settings).run()
