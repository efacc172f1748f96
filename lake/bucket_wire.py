"""The bucket-log writer's wire format on its local socket (:mod:`lake.bucket_writer`): each
message is one length-prefixed JSON frame — an action with a request id, the writer's answer
(the committed event's id or the action's error), or a pushed commit (its rows and files)."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from datetime import datetime
from typing import TYPE_CHECKING, Any

from lake import errors

if TYPE_CHECKING:
    from lake.bucket_store import Action

__all__ = ["action_from_wire", "action_to_wire", "commit_from_wire", "commit_to_wire", "error_from_wire",
           "error_to_wire", "encode_frame", "recv_frame", "send_frame"]

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 << 20


def encode_frame(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


def send_frame(sock: socket.socket, obj: Any) -> None:
    sock.sendall(encode_frame(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Any | None:
    head = _recv_exact(sock, _HEADER.size)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    if size > _MAX_FRAME:
        raise OSError(f"frame of {size} bytes")
    body = _recv_exact(sock, size)
    return None if body is None else json.loads(body)


def action_to_wire(action: "Action") -> dict[str, Any]:
    return dataclasses.asdict(action)


def action_from_wire(d: dict[str, Any]) -> "Action":
    from lake.bucket_store import Action

    fields = {f.name for f in dataclasses.fields(Action)}
    d = {k: v for k, v in d.items() if k in fields}
    for k in ("image_ids", "rejected_ids"):
        d[k] = tuple(d.get(k) or ())
    return Action(**d)


def commit_to_wire(commit: dict[str, Any]) -> dict[str, Any]:
    rows = [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()} for row in commit["rows"]]
    return {**commit, "rows": rows}


def commit_from_wire(commit: dict[str, Any]) -> dict[str, Any]:
    for row in commit["rows"]:
        if isinstance(row.get("at"), str):
            row["at"] = datetime.fromisoformat(row["at"])
    return commit


def error_to_wire(e: BaseException) -> dict[str, Any]:
    name = type(e).__name__ if isinstance(e, errors.ImagelakeError) else "Unavailable"
    return {"error": name, "message": str(e) if isinstance(e, errors.ImagelakeError)
            else f"the bucket log writer failed ({type(e).__name__}); retry with the same client_event_id"}


def error_from_wire(reply: dict[str, Any]) -> errors.ImagelakeError:
    cls = getattr(errors, reply.get("error", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ImagelakeError)):
        cls = errors.Unavailable
    return cls(reply.get("message") or "the bucket log writer refused the action")
