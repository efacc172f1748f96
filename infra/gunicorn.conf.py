# gunicorn settings equivalent to `imagelake serve`, for running gunicorn directly:
#   gunicorn -c infra/gunicorn.conf.py 'dashboards:create_app()'
# Never add preload_app = True: deltalake's runtime must not be forked after use.
import os

bind = f"{os.environ.get('IMAGELAKE_HOST', '127.0.0.1')}:{os.environ.get('IMAGELAKE_PORT', '8000')}"
workers = int(os.environ.get("IMAGELAKE_WORKERS", "2"))
threads = int(os.environ.get("IMAGELAKE_THREADS", "8"))
# gthread that gives no thread to a client before its request head is complete (slow clients)
worker_class = "imagelake.worker.BoundedThreadWorker"
preload_app = False
timeout = 120
graceful_timeout = 20
keepalive = 5                 # a connection silent this long is closed
worker_connections = 1000
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
