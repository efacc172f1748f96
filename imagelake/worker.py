"""The gunicorn worker of ``imagelake serve``: gthread, except that no thread waits for a client
to finish sending its request headers, so slow or silent clients cannot hold every thread.

Stock gthread gives each new connection a thread that waits up to 5 s for a first byte and then
reads the request line and headers with blocking reads and no time limit: 50 idle sockets stalled
every other request for ~30 s, and 200 that sent half a request stalled the server for good. Here a
thread only takes what the socket already holds (non-blocking) into the request parser's buffer;
while the headers are incomplete the connection goes back to the worker's poller, which costs no
thread. So:

* a connection silent for ``keepalive`` seconds is closed (new, half-sent, or kept alive);
* the request line and headers must be complete within :data:`HEADER_TIMEOUT_S` of the
  connection's opening (on a kept-alive connection: of the next request's first byte), else the
  client gets a 408 and the connection is closed — also one that has gone silent meanwhile.

Bodies and slow readers are left to the reverse proxy in front (README, "Deploying behind a
reverse proxy"): a 20 MB upload over a slow link looks the same as a slow attack from here. TLS
connections (gunicorn's ``certfile``) keep stock behaviour: terminate TLS at the proxy.
"""

from __future__ import annotations

import socket
import time
from collections import deque

from gunicorn.workers import gthread

__all__ = ["HEADER_TIMEOUT_S", "BoundedThreadWorker"]

HEADER_TIMEOUT_S = 10.0

_TIMEOUT_BODY = b'{"ok": false, "error": "the request headers took too long to arrive", "status": 408}'
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class BoundedThreadWorker(gthread.ThreadWorker):
    def handle(self, conn):
        if not self.cfg.is_ssl:
            if not conn.initialized:
                conn.init()   # makes the parser (reads nothing); its buffer collects the headers
            state = self._collect_headers(conn)
            if state == "pending":
                return gthread._DEFER if self.alive else False
            if state == "late":
                self._send_timeout(conn)
                return False
        return super().handle(conn)

    def _send_timeout(self, conn) -> None:
        self.log.info("closing %s: no complete request headers within %.0f s", conn.client, HEADER_TIMEOUT_S)
        try:
            conn.sock.send(_TIMEOUT_RESPONSE, socket.MSG_DONTWAIT)
        except OSError:
            pass

    def murder_pending(self):
        """Close parked connections that were silent for ``keepalive`` seconds or whose headers
        are past their deadline (in the main loop, about once a second); a client that sent part
        of a request gets the 408 first."""
        now = time.monotonic()
        keep = deque()
        for conn in self.pending_conns:
            deadline = getattr(conn, "_imagelake_deadline", None)
            if conn.timeout > now and (deadline is None or deadline > now):
                keep.append(conn)
                continue
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            if conn.parser is not None and conn.parser.unreader.buf.getvalue():
                self._send_timeout(conn)
            self.nr_conns -= 1
            conn.close()
        self.pending_conns = keep

    def _collect_headers(self, conn) -> str:
        """Move what the socket holds into the parser's buffer without blocking: ``"ready"`` when
        the headers are complete (or the client closed, or the head is over gunicorn's limits: the
        parser answers those), ``"pending"`` while they are not, ``"late"`` past the deadline."""
        unreader = conn.parser.unreader
        head = unreader.buf.getvalue()
        deadline = getattr(conn, "_imagelake_deadline", None)
        if deadline is None:
            deadline = conn._imagelake_deadline = time.monotonic() + HEADER_TIMEOUT_S
        most = self.cfg.limit_request_line + self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2) + 4
        while not (b"\r\n\r\n" in head or b"\n\n" in head or len(head) > most):
            try:
                data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return "late" if time.monotonic() > deadline else "pending"
            except OSError:
                break   # reset: the parser sees the error and closes
            if not data:
                break   # the client closed
            unreader.buf.seek(0, 2)
            unreader.buf.write(data)
            head += data
        conn._imagelake_deadline = None   # the next request on this connection gets its own
        return "ready"
