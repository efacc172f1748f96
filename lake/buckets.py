"""Buckets: curation as an append-only event log (``bucket_events``); current state is a fold over it.

Every curation action is one row of ``bucket_events`` with a dense ``seq`` that orders the log
(assigned under the table's lock by :mod:`lake.bucket_writer`, which also validates the action
against the state it lands on). Nothing is ever updated in place: a rename is a new ``update``
row, a delete a ``delete`` row (soft: members and history stay), an undo an ``undo`` row naming
the event it cancels. So concurrent curators never overwrite each other and a bucket's past is a
Delta time-travel read away.

Actions (``image_ids`` are sha256 image ids):

=========  ==============================================================================
create     a bucket (``payload``: name, color)
update     rename and/or recolor
delete     soft delete; the bucket disappears from listings, its log stays
add        images become members (``copy`` with ``from_bucket``: members of both)
move       images leave ``from_bucket`` and join ``bucket_id``
remove     images leave the bucket
discard    images join the discard pile (bucket id ``discard``), leaving ``from_bucket`` if given
pending    fast-forward: images join the bucket pending review
feedback   ``image_ids`` accepted (members), ``rejected_ids`` rejected (negatives for the bucket)
undo       cancels ``undo_of``, the actor's latest action not undone yet
=========  ==============================================================================

The fold (:class:`BucketState`) and the SQL (:data:`MEMBERS_SQL`, what analysts and jobs run with
DuckDB) define membership the same way: the latest live event touching (bucket, image) decides.

Python API for other parts of the lake:
:func:`bucket_state` (the whole state, optionally as of a Delta version or time),
:func:`bucket_members` (one bucket's image ids, by DuckDB over the log),
:func:`bucket_history` (a bucket's events and members as of a version).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import duckdb
import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from lake.catalog import Lake, table_spec
from lake.errors import BadInput, NotFound
from lake.remote import delta_options

log = logging.getLogger(__name__)

__all__ = [
    "ACTIONS", "DISCARD", "MEMBERS_SQL", "BucketState", "bucket_history", "bucket_members",
    "bucket_state", "check_bucket_id", "events_from_arrow", "read_events",
]

DISCARD = "discard"
ACTIONS = ("create", "update", "delete", "add", "copy", "move", "remove", "discard", "pending",
           "feedback", "undo")
_BUCKET_ID = re.compile(r"[0-9a-f]{16}")
_IN = {"add", "copy", "move", "discard", "feedback"}
_BUCKET_LEVEL = {"create", "update", "delete"}
#: An undo of an event naming more images than this folds the whole log again (cheaper then).
UNDO_REFOLD_IMAGES = 256


def check_bucket_id(bucket_id: str, *, allow_discard: bool = True) -> str:
    """Return ``bucket_id`` if well formed (16 lowercase hex, or ``discard``), else raise BadInput."""
    if (allow_discard and bucket_id == DISCARD) or _BUCKET_ID.fullmatch(bucket_id or ""):
        return bucket_id
    shown = bucket_id if len(bucket_id or "") <= 40 else bucket_id[:37] + "..."
    raise BadInput(f"malformed bucket id {shown!r}: expected 16 lowercase hex characters"
                   + (" or 'discard'" if allow_discard else ""))


MEMBERS_SQL = """
WITH live AS (
    SELECT * FROM bucket_events
    WHERE action <> 'undo' AND event_id NOT IN (
        SELECT undo_of FROM bucket_events WHERE action = 'undo' AND undo_of IS NOT NULL)),
touch AS (
    SELECT bucket_id, unnest(image_ids) AS image_id, seq, action = 'pending' AS pending, action = 'remove' AS gone
    FROM live WHERE action IN ('add', 'copy', 'move', 'discard', 'pending', 'feedback', 'remove')
    UNION ALL
    SELECT from_bucket, unnest(image_ids), seq, false, true
    FROM live WHERE action IN ('move', 'discard') AND from_bucket IS NOT NULL
    UNION ALL
    SELECT bucket_id, unnest(rejected_ids), seq, false, true FROM live WHERE action = 'feedback')
SELECT bucket_id, image_id, pending, seq AS since_seq FROM touch
QUALIFY row_number() OVER (PARTITION BY bucket_id, image_id ORDER BY seq DESC, gone DESC) = 1 AND NOT gone
ORDER BY bucket_id, since_seq, image_id
"""
"""One row per current (bucket, image) membership over a relation named ``bucket_events``."""


def _system_buckets() -> dict[str, dict[str, Any]]:
    return {DISCARD: {"bucket_id": DISCARD, "name": "Discard pile", "color": "#7f7f7f", "deleted": False,
                      "system": True, "created_by": None, "created_at": None, "updated_at": None, "seq": -1}}


@dataclass
class BucketState:
    """The fold of the log: buckets, members (image -> (seq, pending)), rejections, and what undo needs.

    ``apply`` is idempotent per ``event_id`` (a writer applies its own events before it re-reads
    the file it wrote). An ``undo`` re-folds what the cancelled event touched, because cancelling an
    old event can change what later events meant: a bucket event re-folds that bucket's row, an
    image event each of its images (every event naming the image, in order) and that bucket's
    feedback rounds, leaving the result equal to folding the whole log again, which is what an undo
    of more than ``UNDO_REFOLD_IMAGES`` images (or of an event not in the fold) does.
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    undone: set[str] = field(default_factory=set)
    client_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    buckets: dict[str, dict[str, Any]] = field(default_factory=_system_buckets)
    members: dict[str, dict[str, tuple[int, bool]]] = field(default_factory=dict)  # in (seq, image_id) order
    pending: dict[str, set[str]] = field(default_factory=dict)
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    feedback: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    last_seq: int = -1
    image_events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # events naming an image
    bucket_events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # create/update/delete/feedback

    # -- folding -------------------------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> bool:
        """Fold one event in (``seq`` order); False if it was already folded."""
        if event["event_id"] in self.by_id:
            return False
        self.events.append(event)
        self.by_id[event["event_id"]] = event
        if event.get("client_event_id"):
            self.client_ids[(event.get("actor") or "", event["client_event_id"])] = event["event_id"]
        self.last_seq = max(self.last_seq, event["seq"])
        self._index(event)
        if event["action"] == "undo":
            target = event["undo_of"]
            again = target in self.undone
            self.undone.add(target)
            if again or not self._undo_one(target):
                self._refold()
        else:
            self._fold(event)
        return True

    def _index(self, e: dict[str, Any]) -> None:
        if e["action"] in _BUCKET_LEVEL or e["action"] == "feedback":
            self.bucket_events.setdefault(e["bucket_id"], []).append(e)
        for image_id in {*(e.get("image_ids") or ()), *(e.get("rejected_ids") or ())}:
            self.image_events.setdefault(image_id, []).append(e)

    def _undo_one(self, event_id: str) -> bool:
        """Fold out the event ``event_id`` (just marked undone) by re-folding only what it touched;
        False when a full re-fold is needed instead."""
        target = self.by_id.get(event_id)
        if target is None or target["action"] == "undo":
            return False
        if target["action"] in _BUCKET_LEVEL:
            self._refold_bucket(target["bucket_id"])
            return True
        images = {*(target.get("image_ids") or ()), *(target.get("rejected_ids") or ())}
        if len(images) > UNDO_REFOLD_IMAGES:
            return False
        inserted: set[str] = set()
        for image_id in images:
            for members in self.members.values():
                members.pop(image_id, None)
            for marks in self.pending.values():
                marks.discard(image_id)
            for marks in self.rejected.values():
                marks.pop(image_id, None)
            for e in self.image_events.get(image_id, ()):
                if e["action"] != "undo" and e["event_id"] not in self.undone:
                    self._fold_image(e, image_id, inserted)
        for b in inserted:  # keep (seq, image_id) order, as a full fold leaves it
            members = self.members[b]
            # the re-folded images are the dict's tail, the rest is still in order: check the seam
            tail = sum(1 for i in images if i in members)
            last = list(itertools.islice(reversed(members.items()), tail + 1))[::-1]
            keys = [(seq, i) for i, (seq, _) in last]
            if any(keys[k] > keys[k + 1] for k in range(len(keys) - 1)):  # timsort: ~linear here
                self.members[b] = dict(sorted(members.items(), key=lambda kv: (kv[1][0], kv[0])))
        if target["action"] == "feedback":
            b = target["bucket_id"]
            rounds = [(e["seq"], len(e.get("image_ids") or []), len(e.get("rejected_ids") or []))
                      for e in self.bucket_events.get(b, ()) if e["action"] == "feedback" and e["event_id"] not in self.undone]
            if rounds:
                self.feedback[b] = rounds
            else:
                self.feedback.pop(b, None)
        return True

    def _fold_image(self, e: dict[str, Any], image_id: str, inserted: set[str]) -> None:
        """What :meth:`_fold` of ``e`` does to one image (``inserted``: buckets it entered)."""
        action, b = e["action"], e["bucket_id"]
        ids = e.get("image_ids") or ()
        if action in _IN or action == "pending":
            if image_id in ids:
                if action in ("move", "discard") and e.get("from_bucket"):
                    self._leave(e["from_bucket"], [image_id])
                members = self.members.setdefault(b, {})
                members.pop(image_id, None)
                members[image_id] = (e["seq"], action == "pending")
                inserted.add(b)
                self.rejected.get(b, {}).pop(image_id, None)
                if action == "pending":
                    self.pending.setdefault(b, set()).add(image_id)
                else:
                    self.pending.setdefault(b, set()).discard(image_id)
            if action == "feedback" and image_id in (e.get("rejected_ids") or ()):
                self._leave(b, [image_id])
                self.rejected.setdefault(b, {})[image_id] = e["seq"]
        elif action == "remove" and image_id in ids:
            self._leave(b, [image_id])

    def _refold_bucket(self, bucket_id: str) -> None:
        """Re-fold one bucket's row (its create, updates and delete that are not undone)."""
        system = _system_buckets()
        if bucket_id in system:
            self.buckets[bucket_id] = system[bucket_id]
        else:
            self.buckets.pop(bucket_id, None)
        for e in self.bucket_events.get(bucket_id, ()):
            if e["action"] in _BUCKET_LEVEL and e["event_id"] not in self.undone:
                self._fold(e)
        self.buckets = dict(sorted(self.buckets.items(), key=lambda kv: (not kv[1]["system"], kv[1]["seq"])))

    def _refold(self) -> None:
        self.buckets, self.members, self.rejected, self.feedback = _system_buckets(), {}, {}, {}
        self.pending = {}
        for event in self.events:
            if event["action"] != "undo" and event["event_id"] not in self.undone:
                self._fold(event)

    def _fold(self, e: dict[str, Any]) -> None:
        action, b = e["action"], e["bucket_id"]
        ids = e.get("image_ids") or []
        if action == "create":
            payload = json.loads(e.get("payload") or "{}")
            self.buckets[b] = {"bucket_id": b, "name": payload.get("name"), "color": payload.get("color"),
                               "deleted": False, "system": False, "created_by": e.get("actor_name") or e.get("actor"),
                               "created_at": e.get("at"), "updated_at": e.get("at"), "seq": e["seq"]}
        elif action == "update" and b in self.buckets:
            payload = json.loads(e.get("payload") or "{}")
            self.buckets[b].update({k: v for k, v in payload.items() if k in ("name", "color")},
                                   updated_at=e.get("at"))
        elif action == "delete" and b in self.buckets:
            self.buckets[b].update(deleted=True, updated_at=e.get("at"))
        elif action in _IN or action == "pending":
            if action in ("move", "discard") and e.get("from_bucket"):
                self._leave(e["from_bucket"], ids)
            members, rejected = self.members.setdefault(b, {}), self.rejected.get(b, {})
            pending = self.pending.setdefault(b, set())
            for image_id in sorted(ids):  # re-inserted: dict order stays (seq, image_id), as in SQL
                members.pop(image_id, None)
                members[image_id] = (e["seq"], action == "pending")
                rejected.pop(image_id, None)
                if action == "pending":
                    pending.add(image_id)
                else:
                    pending.discard(image_id)
            if action == "feedback":
                rej = e.get("rejected_ids") or []
                self._leave(b, rej)
                marks = self.rejected.setdefault(b, {})
                for image_id in rej:
                    marks[image_id] = e["seq"]
                self.feedback.setdefault(b, []).append((e["seq"], len(ids), len(rej)))
        elif action == "remove":
            self._leave(b, ids)

    def _leave(self, bucket_id: str, image_ids: Iterable[str]) -> None:
        members, pending = self.members.get(bucket_id), self.pending.get(bucket_id)
        if members:
            for image_id in image_ids:
                members.pop(image_id, None)
                if pending:
                    pending.discard(image_id)

    # -- reading -------------------------------------------------------------------------------

    def live_bucket(self, bucket_id: str) -> dict[str, Any]:
        """The bucket's row. Raises NotFound (unknown) or Conflict (deleted)."""
        from lake.errors import Conflict

        check_bucket_id(bucket_id)
        bucket = self.buckets.get(bucket_id)
        if bucket is None:
            raise NotFound(f"no bucket {bucket_id}; GET /api/v1/buckets lists them")
        if bucket["deleted"]:
            raise Conflict(f"bucket {bucket_id} ({bucket['name']!r}) is deleted; undo the delete or use another bucket")
        return bucket

    def member_ids(self, bucket_id: str, *, pending: bool | None = None) -> list[str]:
        """Members in the order they joined; ``pending`` True/False filters, None gives both."""
        members = self.members.get(bucket_id, {})
        if pending is None:
            return list(members)
        if pending and not self.pending.get(bucket_id):
            return []
        return [i for i, (_, p) in members.items() if p == pending]

    def labeled(self, bucket_id: str | None = None) -> set[str]:
        """Images a bucket's suggestions must skip: members of any live bucket (pending included)
        or of the discard pile, and those rejected for ``bucket_id`` (for every live bucket when
        None). An image rejected for one bucket may still be right for another. A deleted bucket's
        members and rejections label nothing (undoing the delete brings them back)."""
        out: set[str] = set()
        for b, members in self.members.items():
            if self._live(b):
                out.update(members)
        for b, marks in self.rejected.items():
            if (bucket_id is None or b == bucket_id) and self._live(b):
                out.update(marks)
        return out

    def _live(self, bucket_id: str) -> bool:
        bucket = self.buckets.get(bucket_id)
        return bucket is not None and not bucket["deleted"]

    def acceptance(self, bucket_id: str, window: int = 5) -> float | None:
        """Accepted share of the last ``window`` feedback rounds of the bucket (None: no feedback yet)."""
        rounds = self.feedback.get(bucket_id, [])[-window:]
        total = sum(a + r for _, a, r in rounds)
        return None if total == 0 else sum(a for _, a, _ in rounds) / total

    def last_undoable(self, actor: str) -> dict[str, Any] | None:
        for event in reversed(self.events):
            if event.get("actor") == actor and event["action"] != "undo" and event["event_id"] not in self.undone:
                return event
        return None

    def bucket_row(self, bucket_id: str) -> dict[str, Any] | None:
        """One bucket's listing row (deleted ones too), or None."""
        b = self.buckets.get(bucket_id)
        if b is None:
            return None
        pending = len(self.pending.get(bucket_id, ()))
        return {**b, "count": len(self.members.get(bucket_id, {})) - pending, "pending": pending}

    def listing(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        """Buckets in creation order with member and pending counts."""
        out = []
        for b in sorted(self.buckets.values(), key=lambda b: b["seq"]):
            if b["deleted"] and not include_deleted:
                continue
            members = self.members.get(b["bucket_id"], {})
            pending = len(self.pending.get(b["bucket_id"], ()))
            out.append({**b, "count": len(members) - pending, "pending": pending})
        return out


def events_from_arrow(table: pa.Table) -> list[dict[str, Any]]:
    spec = table_spec("bucket_events")
    for name in spec.schema.names:
        if name not in table.column_names:  # a log written before a column existed
            table = table.append_column(name, pa.nulls(table.num_rows, spec.schema.field(name).type))
    rows = table.select(spec.schema.names).to_pylist()
    rows.sort(key=lambda r: r["seq"] if r["seq"] is not None else -1)
    return rows


def _open(lake: Lake, version: int | None = None, as_of: dt.datetime | None = None) -> DeltaTable | None:
    try:
        table = DeltaTable(lake.table_uri("bucket_events"), storage_options=delta_options(lake))
    except TableNotFoundError:
        return None
    try:
        if version is not None:
            table.load_as_version(version)
        elif as_of is not None:
            table.load_as_version(as_of)
    except Exception as e:  # deltalake raises several types for a version outside the log
        # The library's text names the table's path: it goes to the log, not to the caller.
        log.info("bucket_events version %s not loadable: %s", version if version is not None else as_of, e)
        latest = DeltaTable(lake.table_uri("bucket_events"), storage_options=delta_options(lake)).version()
        what = f"version {version}" if version is not None else f"version as of {as_of.isoformat()}"
        raise NotFound(f"bucket_events has no {what}; its versions are 0 to {latest}") from None
    return table


def read_events(lake: Lake, version: int | None = None, as_of: dt.datetime | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Every event in ``seq`` order as of ``version`` / ``as_of`` (default: latest) and that version."""
    table = _open(lake, version, as_of)
    if table is None:
        return [], None
    return events_from_arrow(_read(table, version, as_of)), table.version()


def _read(table: DeltaTable, version: int | None, as_of: dt.datetime | None) -> pa.Table:
    """The whole log at the loaded version. An old version may name files that VACUUM deleted
    (``imagelake janitor``, past ``vacuum_retention_h``): that version is gone, a 404, not a 500."""
    try:
        return table.to_pyarrow_table()
    except FileNotFoundError:
        if version is None and as_of is None:
            raise
        raise NotFound(f"bucket_events version {table.version()} is older than the vacuum retention "
                       "(setting vacuum_retention_h): the janitor's vacuum deleted its files") from None


def bucket_state(lake: Lake, version: int | None = None, as_of: dt.datetime | None = None) -> BucketState:
    """The fold of the whole log, now or as of a Delta ``version`` / timestamp ``as_of``.

    Raises:
        NotFound: no such version.
    """
    state = BucketState()
    for event in read_events(lake, version, as_of)[0]:
        state.apply(event)
    return state


def bucket_members(lake: Lake, bucket_id: str, *, include_pending: bool = False,
                   version: int | None = None) -> list[str]:
    """Image ids in ``bucket_id`` in the order they joined — the query export, grid overlay and
    learned tags use. Computed by DuckDB over the log (:data:`MEMBERS_SQL`).

    Raises:
        BadInput: malformed id. NotFound: no such bucket (deleted buckets still answer).
    """
    check_bucket_id(bucket_id)
    table = _open(lake, version)
    arrow = _read(table, version, None) if table is not None else table_spec("bucket_events").schema.empty_table()
    if bucket_id != DISCARD and not _created(arrow, bucket_id):
        raise NotFound(f"no bucket {bucket_id}")
    con = duckdb.connect()
    try:
        con.register("bucket_events", pa.Table.from_pylist(events_from_arrow(arrow), schema=table_spec("bucket_events").schema))
        rows = con.sql(f"SELECT image_id, pending FROM ({MEMBERS_SQL}) WHERE bucket_id = ?",
                       params=[bucket_id]).fetchall()
    finally:
        con.close()
    return [image_id for image_id, pending in rows if include_pending or not pending]


def _created(table: pa.Table, bucket_id: str) -> bool:
    import pyarrow.compute as pc

    mask = pc.and_(pc.equal(table.column("bucket_id"), bucket_id), pc.equal(table.column("action"), "create"))
    return bool(pc.any(mask).as_py())


def bucket_history(lake: Lake, bucket_id: str, *, version: int | None = None,
                   as_of: dt.datetime | None = None) -> dict[str, Any]:
    """A bucket as of a Delta version (or time) of the log: its row, members, and every event that
    touched it up to then, oldest first.

    Raises:
        BadInput: malformed id. NotFound: no such version, or the bucket did not exist then.
    """
    check_bucket_id(bucket_id)
    events, read_version = read_events(lake, version, as_of)
    state = BucketState()
    for event in events:
        state.apply(event)
    bucket = state.buckets.get(bucket_id)
    if bucket is None:
        raise NotFound(f"bucket {bucket_id} did not exist at version {read_version}")
    touched = [e for e in events if bucket_id in (e["bucket_id"], e.get("from_bucket"))
               or (e["action"] == "undo" and state.by_id.get(e["undo_of"], {}).get("bucket_id") == bucket_id)]
    return {"version": read_version, "bucket": bucket, "members": state.member_ids(bucket_id, pending=False),
            "pending": state.member_ids(bucket_id, pending=True),
            "events": [{**e, "undone": e["event_id"] in state.undone} for e in touched]}
