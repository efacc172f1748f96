"""One bucket-log writer per node: the server's worker processes elect one of themselves, and the
others hand it their actions over a local socket, so one group commit takes every worker's actions.

Election is a ``bind`` of an abstract unix socket named after the lake (Linux; no file to clean
up): the kernel lets exactly one process hold the name and frees it the instant that process
dies, ``kill -9`` included. The winner listens; every other worker connects and sends each action
as one length-prefixed JSON frame with a request id, and gets back the committed event's id (or the
action's error) once the commit has landed. The writer queues remote actions into the same
group-commit queue as its own requests (:class:`lake.bucket_store.BucketStore`).

Failover: when the connection to the writer breaks (its process died, or recycled), each follower
with requests in flight tries the ``bind`` itself; one wins and becomes the writer, the others
connect to it, and every unanswered action is sent again with the same ``event_id``. An action the
dead writer had committed is recognised by that id and answered with its event, so a re-send never
writes twice and an acknowledged action is never lost (it was committed before it was
acknowledged). No timer is involved: takeover takes milliseconds plus the new writer's first read.
A writer that hangs without dying (it keeps the name and the connection) is detected by silence: a
follower whose action waited ``hung_s`` with nothing at all from the writer commits it, and its next
actions, itself (its own group-commit thread, ordered by Delta versions like another node) until
the writer sends anything again; event ids keep the hung writer's queued copy from landing twice.

Read-your-writes: a follower folds the log's tail in before it answers. Other workers learn of
the commit from the node's *version board*, a few bytes in shared memory (``/dev/shm``) that the
writer updates after each commit and before it acknowledges any action of it (and, before each
commit, with the version it is about to create, so a follower waits for a push only for those): a read checks the
board (one ``pread``) and re-reads the Delta log's tail only when the board is ahead of what it
has folded, so the curator's next read, whichever worker takes it, sees the write, without every
read polling the log. Commits of other nodes are seen within ``refresh_s`` (each worker re-checks
the log itself at that interval).

Only processes of the same user may connect (``SO_PEERCRED``); abstract sockets have no file
permissions. Across nodes (several API machines on one object-store lake) each node has its own
writer and the writers order their commits by Delta version (see :mod:`lake.bucket_store`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from lake import errors
from lake.bucket_board import VersionBoard
from lake.bucket_wire import (action_from_wire, action_to_wire, commit_from_wire, commit_to_wire, error_from_wire,
                              encode_frame, error_to_wire, recv_frame, send_frame)

if TYPE_CHECKING:
    from lake.bucket_store import Action, BucketStore

__all__ = ["NodeLink", "VersionBoard", "socket_name"]

log = logging.getLogger(__name__)


def socket_name(lake_root: str) -> str:
    """The abstract socket name of a lake's writer on this node (per user)."""
    root = lake_root if "://" in lake_root else os.path.realpath(lake_root)
    digest = hashlib.sha256(f"{os.getuid()}\0{root}".encode()).hexdigest()[:24]
    return f"\0imagelake-bucket-writer-{digest}"


class _WriterLost(Exception):
    """The connection to the writer broke before it answered."""


class _WriterHung(Exception):
    """The writer holds the name and the connection but has sent nothing for ``hung_s``."""


class _Connection:
    """A follower's connection to the writer: many requests in flight, answered by id."""

    def __init__(self, sock: socket.socket, on_push):
        self.sock, self.on_push = sock, on_push
        self.alive = True
        self.heard_at = time.monotonic()  # the last frame from the writer
        self.hung = False  # the writer went silent with requests waiting: commit here meanwhile
        self._send_lock = threading.Lock()
        self._mu = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._next = 0
        threading.Thread(target=self._read_loop, name="bucket-writer-link", daemon=True).start()

    def request(self, action: "Action") -> Future:
        future: Future = Future()
        with self._mu:
            if not self.alive:
                future.set_exception(_WriterLost())
                return future
            self._next += 1
            rid = self._next
            self._pending[rid] = future
        try:
            with self._send_lock:
                send_frame(self.sock, {"id": rid, "action": action_to_wire(action)})
        except OSError:
            self._fail()
        return future

    def _read_loop(self) -> None:
        try:
            while True:
                reply = recv_frame(self.sock)
                if reply is None:
                    break
                self.heard_at = time.monotonic()
                if self.hung:
                    self.hung = False
                    log.warning("the bucket log writer of this node answers again; handing it the writes")
                if "push" in reply:  # a commit, sent before the answers to its actions
                    try:
                        self.on_push(commit_from_wire(reply["push"]))
                    except Exception:  # a push only saves a read; never lose the link over one
                        log.exception("could not fold in a pushed bucket log commit")
                    continue
                with self._mu:
                    future = self._pending.pop(reply.get("id"), None)
                if future is not None:
                    future.set_result(reply)
        except (OSError, ValueError):
            pass
        self._fail()

    def _fail(self) -> None:
        with self._mu:
            self.alive = False
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_WriterLost())
        try:
            self.sock.close()
        except OSError:
            pass


class NodeLink:
    """A worker's link to the node's bucket-log writer (which may be this very process)."""

    def __init__(self, store: "BucketStore", name: str | None = None, hung_s: float = 5.0):
        self.store, self.hung_s = store, hung_s
        self.name = name or socket_name(store.lake.root)
        self._mu = threading.Lock()
        self._listener: socket.socket | None = None
        self._conn: _Connection | None = None
        self.board = VersionBoard(self.name)
        self._retire_registered = False
        os.register_at_fork(after_in_child=self._after_fork)
        self._peers: dict[socket.socket, threading.Lock] = {}
        self._peers_mu = threading.Lock()
        self._serving: set[threading.Thread] = set()  # one per follower connection, under _peers_mu
        self._retired = False
        self._outbox: dict[socket.socket, tuple[threading.Lock, list[bytes]]] | None = None  # a batch's frames
        self._outbox_mu = threading.Lock()
        self.takeovers = 0  # times this process became the writer after another writer went away

    @property
    def is_writer(self) -> bool:
        return self._listener is not None

    @property
    def connected(self) -> bool:
        """A follower with a live link to a writer that answers (whose pushes keep its fold current)."""
        conn = self._conn
        return conn is not None and conn.alive and not conn.hung

    @property
    def commits_here(self) -> bool:
        """This process commits: it is the writer, or a follower writing past a hung writer."""
        conn = self._conn
        return self.is_writer or (conn is not None and conn.alive and conn.hung)

    def _after_fork(self) -> None:
        """A forked child must not keep the writer's name bound (it has no accept thread: the
        node would have a writer nobody answers once the parent dies) nor share its link."""
        for sock in (self._listener, self._conn.sock if self._conn is not None else None):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._listener, self._conn = None, None
        self._mu, self._peers_mu, self._peers = threading.Lock(), threading.Lock(), {}
        self._serving = set()

    # -- the follower side ---------------------------------------------------------------------

    def submit(self, action: "Action", timeout: float) -> dict[str, Any]:
        """Commit ``action`` through the node's writer; its event once committed and folded here."""
        deadline = time.monotonic() + timeout
        resent = False
        while True:
            conn = self._connect(deadline)
            if conn is None or conn.hung:  # this process is the writer, or the writer hangs
                from lake.bucket_store import wait_for

                return wait_for(self.store.enqueue(action), deadline - time.monotonic())
            try:
                reply = self._reply(conn, conn.request(action), deadline)
            except _WriterHung:
                log.warning("the bucket log writer of this node sent nothing for %.0f s with action %s "
                            "waiting; this process commits it (and its next ones) itself, ordered by Delta "
                            "version, until the writer answers again", self.hung_s, action.event_id)
                continue
            except _WriterLost:
                resent = True
                log.warning("the bucket log writer went away with action %s in flight; sending it again",
                            action.event_id)
                continue
            except FutureTimeout:
                raise errors.Unavailable(f"the bucket log writer did not answer within {timeout:.0f} s; "
                                         "retry with the same client_event_id") from None
            if "error" in reply:
                raise error_from_wire(reply)
            replayed = bool(reply.get("replayed")) and not (resent and reply["event_id"] == action.event_id)
            return self.store.committed(reply["event_id"], replayed=replayed)

    def _reply(self, conn: _Connection, future: Future, deadline: float) -> dict[str, Any]:
        """The writer's answer; raises _WriterHung (and marks the link hung) when the writer has
        sent nothing at all, no answer and no push, for ``hung_s`` while this request waited."""
        sent = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                return future.result(timeout=max(0.0, min(deadline - now, 0.25)))
            except FutureTimeout:
                now = time.monotonic()
                if now >= deadline:
                    raise
                if conn.hung:  # another request on this link found the writer hung
                    raise _WriterHung() from None
                if self.hung_s > 0 and now - max(sent, conn.heard_at) >= self.hung_s and conn.alive:
                    conn.hung = True
                    raise _WriterHung() from None

    def _connect(self, deadline: float) -> _Connection | None:
        """The live connection to the writer, or None once this process is the writer."""
        pause = 0.002
        while True:
            with self._mu:
                if self._listener is not None:
                    return None
                if self._retired:
                    raise errors.Unavailable("this process has stopped writing the bucket log (shutting "
                                             "down); retry")
                if self._conn is not None and self._conn.alive:
                    return self._conn
                if self._try_bind():
                    return None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(self.name)
                except OSError:  # bound but not listening yet, or just died: elect again
                    sock.close()
                else:
                    self._conn = _Connection(sock, self.store.apply_pushed)
                    return self._conn
            if time.monotonic() > deadline:
                raise errors.Unavailable("no bucket log writer on this node answered; retry")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    # -- the writer side -----------------------------------------------------------------------

    def _try_bind(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
        except OSError:
            sock.close()
            return False
        sock.listen(128)
        had_writer = self._conn is not None
        self._listener, self._conn = sock, None
        if had_writer:
            self.takeovers += 1
            log.warning("the bucket log writer of this node went away; pid %d took over", os.getpid())
        else:
            log.info("pid %d is the bucket log writer of this node", os.getpid())
        threading.Thread(target=self._accept_loop, args=(sock,), name="bucket-writer-accept", daemon=True).start()
        if not self._retire_registered:
            atexit.register(self.retire)
            self._retire_registered = True
        return True

    def retire(self, timeout: float = 10.0) -> None:
        """Stop being the writer (at exit): free the name so a follower takes over, hang up on the
        followers (they re-send what is unanswered), and let the commits under way finish, so the
        process does not exit in the middle of one. Re-sent actions that this writer still commits
        are recognised by their ``event_id`` (the two writers' commits are ordered by version)."""
        with self._mu:
            self._retired = True
            listener, self._listener = self._listener, None
        if listener is None:
            return
        for sock in [listener, *self._peer_sockets()]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            listener.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # each queues what it had read, then sees the hang-up
            with self._peers_mu:
                serving = [t for t in self._serving if t is not threading.current_thread()]
            if not serving:
                break
            serving[0].join(max(0.0, deadline - time.monotonic()))
        if not self.store.close(max(0.1, deadline - time.monotonic())):
            log.warning("the bucket log writer exited with actions still queued; their senders re-send them")

    def _peer_sockets(self) -> list[socket.socket]:
        with self._peers_mu:
            return list(self._peers)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
            except OSError:
                uid = -1
            if uid != os.getuid():
                log.warning("refused a bucket log connection from uid %d", uid)
                sock.close()
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), name="bucket-writer-peer", daemon=True)
            with self._peers_mu:
                self._serving.add(thread)
            thread.start()

    @contextlib.contextmanager
    def batch(self):
        """``with link.batch():`` around committing and answering one batch (the writer thread):
        each follower then gets the batch's push and its answers as one write at the end, instead
        of one ``sendall`` per frame — on a busy 2-core machine each socket call can cost the writer
        thread a wait of up to the interpreter's switch interval (5 ms) to get the GIL back. Frames
        posted meanwhile by other threads (an answer whose callback ran in the peer's thread) join
        the same outbox, so a push still reaches every follower before the answers it precedes."""
        with self._outbox_mu:
            self._outbox = {}
        try:
            yield
        finally:
            with self._outbox_mu:
                outbox, self._outbox = self._outbox, None
            for sock, (send_lock, frames) in outbox.items():
                self._write(sock, send_lock, b"".join(frames))

    def _post(self, sock: socket.socket, send_lock: threading.Lock, frame: bytes) -> None:
        """Send ``frame`` now, or add it to the batch's outbox (sent in order at its end)."""
        with self._outbox_mu:
            if self._outbox is not None:
                self._outbox.setdefault(sock, (send_lock, []))[1].append(frame)
                return
        self._write(sock, send_lock, frame)

    def _write(self, sock: socket.socket, send_lock: threading.Lock, data: bytes) -> None:
        try:
            with send_lock:
                sock.sendall(data)
        except OSError:  # the follower died; its actions' fate is in the log
            with self._peers_mu:
                self._peers.pop(sock, None)

    def broadcast(self, commit: dict[str, Any]) -> None:
        """Push a commit to every follower (called by the writer before it answers anyone)."""
        with self._peers_mu:
            peers = list(self._peers.items())
        if not peers:
            return
        frame = encode_frame({"push": commit_to_wire(commit)})
        for sock, send_lock in peers:
            self._post(sock, send_lock, frame)

    def _serve(self, sock: socket.socket) -> None:
        send_lock = threading.Lock()
        with self._peers_mu:
            self._peers[sock] = send_lock
        if self._retired:  # accepted just as this writer retired: hang up, the follower re-sends
            sock.close()
            with self._peers_mu:
                self._peers.pop(sock, None)
                self._serving.discard(threading.current_thread())
            return

        def answer(rid: Any, future: Future) -> None:
            try:
                event = future.result()
                reply = {"id": rid, "event_id": event["event_id"], "replayed": bool(event.get("replayed"))}
            except BaseException as e:
                reply = {"id": rid, **error_to_wire(e)}
            self._post(sock, send_lock, encode_frame(reply))

        try:
            while True:
                frame = recv_frame(sock)
                if frame is None:
                    break
                rid = frame.get("id")
                try:
                    future = self.store.enqueue(action_from_wire(frame["action"]))
                except (TypeError, KeyError, ValueError, errors.ImagelakeError) as e:
                    future = Future()
                    future.set_exception(e if isinstance(e, errors.ImagelakeError)
                                         else errors.BadInput(f"malformed action frame: {e}"))
                future.add_done_callback(lambda f, rid=rid: answer(rid, f))
        except (OSError, ValueError):
            pass
        finally:
            with self._peers_mu:
                self._peers.pop(sock, None)
                self._serving.discard(threading.current_thread())
            try:
                sock.close()
            except OSError:
                pass
