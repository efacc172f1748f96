"""What a curation action becomes in the bucket log: :class:`Action` (a request before
validation) and :func:`_plan`, which validates it against the fold it lands on and returns its
event (``seq``, what an undo cancels, names and colours checked). Pure: no I/O."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from lake.buckets import DISCARD, BucketState, check_bucket_id
from lake.commit import now_utc
from lake.errors import BadInput, Conflict, NotFound

__all__ = ["Action", "MAX_NAME"]

_COLOR = r"#[0-9a-fA-F]{6}"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Action:
    """One curation request, before validation. ``actor`` is the token id (``""`` with auth off)."""

    action: str
    bucket_id: str | None = None
    image_ids: tuple[str, ...] = ()
    rejected_ids: tuple[str, ...] = ()
    from_bucket: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    actor: str = ""
    actor_name: str = ""
    client_event_id: str | None = None
    event_id: str | None = None  # chosen by the submitter, so a re-sent action is recognised

    def with_event_id(self) -> "Action":
        return self if self.event_id else dataclasses.replace(self, event_id=secrets.token_hex(16))


def _clean_ids(ids: tuple[str, ...], what: str = "image_ids") -> list[str]:
    out = list(dict.fromkeys(ids))
    if not out:
        raise BadInput(f"{what} is empty; send at least one image id")
    return out


def _plan(state: BucketState, a: Action, seq: int) -> dict[str, Any]:
    """The event ``a`` becomes on top of ``state``. Raises BadInput, NotFound or Conflict."""
    event: dict[str, Any] = {"event_id": a.event_id or secrets.token_hex(16), "seq": seq, "bucket_id": a.bucket_id,
                             "action": a.action, "image_ids": None, "rejected_ids": None,
                             "from_bucket": None, "undo_of": None, "payload": None,
                             "client_event_id": a.client_event_id, "actor": a.actor,
                             "actor_name": a.actor_name, "at": now_utc()}
    kind = a.action
    if kind == "create":
        name, color = _name(a.payload.get("name")), _color(a.payload.get("color"))
        bucket_id = a.bucket_id or secrets.token_hex(8)
        if bucket_id in state.buckets:
            raise Conflict(f"bucket {bucket_id} exists already")
        color = color or _PALETTE[sum(1 for b in state.buckets.values() if not b["system"]) % len(_PALETTE)]
        return {**event, "bucket_id": bucket_id, "payload": json.dumps({"name": name, "color": color})}
    if kind == "undo":
        target = state.last_undoable(a.actor)
        if target is None:
            raise Conflict("nothing to undo: this token has no action left that is not undone")
        return {**event, "bucket_id": target["bucket_id"], "undo_of": target["event_id"]}
    if a.bucket_id == DISCARD and kind not in ("discard", "remove"):
        raise BadInput("the discard pile takes images with POST /api/v1/discard and gives them back with "
                       "DELETE /api/v1/buckets/discard/images/<image_id>")
    state.live_bucket(a.bucket_id)
    if kind == "update":
        payload = {}
        if a.payload.get("name") is not None:
            payload["name"] = _name(a.payload["name"])
        if a.payload.get("color") is not None:
            payload["color"] = _color(a.payload["color"])
        if not payload:
            raise BadInput('send {"name": ...} and/or {"color": "#rrggbb"}')
        return {**event, "payload": json.dumps(payload)}
    if kind == "delete":
        return event
    ids = _clean_ids(a.image_ids) if kind != "feedback" else list(dict.fromkeys(a.image_ids))
    members = state.members.get(a.bucket_id, {})
    if kind in ("move", "copy") or (kind == "discard" and a.from_bucket):
        source = check_bucket_id(a.from_bucket or "")
        if source == a.bucket_id:
            raise BadInput("from_bucket is the target bucket itself")
        state.live_bucket(source)
        source_members = state.members.get(source, {})
        missing = [i for i in ids if i not in source_members]
        if missing:
            raise Conflict(f"{len(missing)} of the images are not in bucket {source} (first: {missing[0]})")
        event["from_bucket"] = source
    elif kind == "remove":
        missing = [i for i in ids if i not in members]
        if missing:
            raise NotFound(f"{len(missing)} of the images are not in bucket {a.bucket_id} (first: {missing[0]})")
    elif kind == "pending":
        labeled = state.labeled(a.bucket_id)
        ids = [i for i in ids if i not in labeled]
        if not ids:
            raise Conflict("every image is labeled already; nothing to fast-forward")
    elif kind == "feedback":
        rejected = list(dict.fromkeys(a.rejected_ids))
        if not ids and not rejected:
            raise BadInput('send {"accepted": [image ids], "rejected": [image ids]} with at least one id')
        both = set(ids) & set(rejected)
        if both:
            raise BadInput(f"image {sorted(both)[0]} is both accepted and rejected")
        event["rejected_ids"] = rejected
    elif kind not in ("add", "discard"):
        raise BadInput(f"unknown action {kind!r}")
    event["image_ids"] = ids
    return event


MAX_NAME = 200
# Bidirectional formatting controls: they reorder how the text around a name is shown (a name
# could make a listing read differently from what it holds).
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _name(value: Any) -> str:
    """A bucket name as stored: NFC-normalised, trimmed, 1 to 200 characters, printable.

    Names end up in every listing, export and SQL result: a NUL, a line break, a lone surrogate
    (which fails every UTF-8 conversion of the log) or a bidi override would corrupt or disguise
    them, so each is refused with the rule it breaks."""
    if not isinstance(value, str):
        raise BadInput(f"a bucket name must be a string, got {type(value).__name__}")
    for i, ch in enumerate(value):
        code = ord(ch)
        category = unicodedata.category(ch)
        if category == "Cs":
            raise BadInput(f"a bucket name must be valid Unicode: a lone surrogate U+{code:04X} at position {i}")
        if category in ("Cc", "Zl", "Zp"):
            raise BadInput(f"a bucket name must not contain control characters or line breaks "
                           f"(U+{code:04X} at position {i})")
        if code in _BIDI:
            raise BadInput(f"a bucket name must not contain bidirectional formatting characters "
                           f"(U+{code:04X} at position {i})")
    name = unicodedata.normalize("NFC", value).strip()
    if not name:
        raise BadInput("a bucket name must not be empty or only spaces")
    if len(name) > MAX_NAME:
        raise BadInput(f"a bucket name must be at most {MAX_NAME} characters; this one has {len(name)}")
    return name


def _color(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(_COLOR, value):
        raise BadInput(f"color must look like #1f77b4, got {value!r}")
    return value.lower()
