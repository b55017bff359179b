"""The AuditFeed servicer (proto/tracecode/v1/audit.proto): the audit streams, read through a
named consumer group, for the ledger console and other admin readers. Thin: names are checked
and converted here; the reading order and every Redis detail are the store's (store/audit.py).

Admin identities only: every method calls the same `authorize` hook as the Admin servicer (and
the policy table of auth.py lets no site reach the service at all).

A Watch sends what one read of the streams returned (in batches of max_batch events), then waits
for all of it to be acknowledged before reading again: an Ack that reaches this process wakes it
at once (`_Flights`); an Ack sent to another process of the deployment is seen in Redis at the
next poll (POLL_S). The Watch ends when the server stops
(`stopping`, set by Server.stop before the drain), so an open feed never holds a graceful stop
for its whole grace period; the reader reconnects.

May import: grpc, the generated stubs, the store, tracecode.rules, and this package's status.
"""
from __future__ import annotations

import threading
from typing import Iterator

from tracecode.rules.schema import AUDIT_TYPES
from tracecode.v1 import audit_pb2 as apb
from tracecode.v1 import audit_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from ..errors import InvalidRequest
from ..store import AuditEntry, AuditReader, Follower, Store
from ..store.audit import MAX_BLOCK_MS, check_name, parse_cursor
from . import convert
from .status import answer, guarded

DEFAULT_BATCH, MAX_BATCH = 200, 10_000
DEFAULT_CLAIM_IDLE_MS = 60_000
# How often a Watch whose batch is unacknowledged looks in Redis (acks sent to another process).
POLL_S = 1.0
MAX_CACHED_GROUPS = 64

_TYPES = {t: apb.AuditEventType.Value(f"AUDIT_{t}") for t in AUDIT_TYPES}
_VERDICTS = frozenset(pb.Verdict.keys())


def _int(text: str) -> int:
    try:
        return int(text or 0)
    except ValueError:  # never written so by the scripts; one bad field must not stop the feed
        return 0


def event_pb(e: AuditEntry) -> apb.AuditEvent:
    """One entry as an AuditEvent. Only fields the scripts wrote: the pseudonym is the only
    insured id an entry holds (the scripts never write a raw one)."""
    t = e.get("t")
    x = e.get("x")
    ev = apb.AuditEvent(
        cursor=e.cursor, type=_TYPES.get(t, apb.AUDIT_EVENT_TYPE_UNSPECIFIED), detail=x,
        canonical_code=e.get("c"), site_id=e.get("s"), settlement_id=e.get("i"),
        line_index=_int(e.get("l")), units=_int(e.get("u")), insured_pseudonym=e.get("p"),
        sanction_id=e.get("n"), sanction_kind=e.get("k"), sanction_reference=e.get("r"),
        sanction_actor=e.get("b"), product_id=e.get("g"), supplier=e.get("d"))
    if t in ("ATTEMPT", "RECEIVE_FLAGGED") and x in _VERDICTS:
        ev.verdict = pb.Verdict.Value(x)
    if e.get("a"):
        ev.at.CopyFrom(convert.ts(_int(e.get("a"))))
    return ev


def _name(field: str, value: str) -> str:
    try:
        return check_name(field, value)
    except ValueError as exc:
        raise InvalidRequest([(field, str(exc))]) from None


def _bounded(field: str, value: int, default: int, top: int) -> int:
    if value > top:
        raise InvalidRequest([(field, f"{value} is more than {top}")])
    return value or default


class _Flight:
    __slots__ = ("group", "outstanding")

    def __init__(self, group: str):
        self.group = group
        self.outstanding: set[str] = set()


class _Flights:
    """The batches Watch calls of this process have in flight, so that an Ack wakes its Watch."""

    def __init__(self):
        self._cond = threading.Condition()
        self._open: set[_Flight] = set()

    def open(self, group: str) -> _Flight:
        f = _Flight(group)
        with self._cond:
            self._open.add(f)
        return f

    def close(self, f: _Flight) -> None:
        with self._cond:
            self._open.discard(f)

    def acked(self, group: str, cursors: list[str]) -> None:
        with self._cond:
            for f in self._open:
                if f.group == group:
                    f.outstanding.difference_update(cursors)
            self._cond.notify_all()

    def wait(self, f: _Flight, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not f.outstanding, timeout)


class AuditFeedServicer(audit_pb2_grpc.AuditFeedServicer):
    def __init__(self, store: Store, authorize=None):
        self.store = store
        self.authorize = authorize or (lambda context: None)
        self.stopping = threading.Event()
        self._flights = _Flights()
        self._readers: dict[str, AuditReader] = {}
        self._lock = threading.Lock()

    def _reader(self, group: str) -> AuditReader:
        group = _name("group", group)
        with self._lock:
            r = self._readers.get(group)
            if r is None:
                r = AuditReader.of(self.store, group)
                if len(self._readers) < MAX_CACHED_GROUPS:  # names come from callers: keep a bounded few
                    self._readers[group] = r
            return r

    def Watch(self, request: apb.WatchRequest, context) -> Iterator[apb.AuditEventBatch]:
        try:
            yield from self._watch(request, context)
        except Exception as exc:  # noqa: BLE001 - every error gets its status (answer), unknown ones INTERNAL
            answer(context, exc, "Watch")

    def _watch(self, request: apb.WatchRequest, context) -> Iterator[apb.AuditEventBatch]:
        self.authorize(context)
        reader = self._reader(request.group)
        max_batch = _bounded("max_batch", request.max_batch, DEFAULT_BATCH, MAX_BATCH)
        follower = Follower(reader, _name("consumer", request.consumer), per_stream=max_batch,
                            claim_idle_ms=request.claim_idle_ms or DEFAULT_CLAIM_IDLE_MS)
        block_ms = _bounded("block_ms", request.block_ms, MAX_BLOCK_MS, MAX_BLOCK_MS)
        # The data set must still be the one this server opened (store/marker.py): a feed never
        # delivers the events of a data set re-created under it.
        self.store.recheck_dataset()
        reader.ensure_group()
        if request.from_start:
            reader.reset()
        flight = self._flights.open(reader.group)
        try:
            while context.is_active() and not self.stopping.is_set():
                if flight.outstanding:
                    self._flights.wait(flight, POLL_S)
                batch = follower.next(block_ms)
                if batch is None:  # acknowledged elsewhere, or not yet: look again after a while
                    if not flight.outstanding:
                        self.stopping.wait(POLL_S / 10)
                    continue
                flight.outstanding = {e.cursor for e in batch}
                if not batch:
                    yield apb.AuditEventBatch()  # a heartbeat
                # One read, in messages of max_batch events; the next read once all are acknowledged.
                for i in range(0, len(batch), max_batch):
                    yield apb.AuditEventBatch(events=[event_pb(e) for e in batch[i:i + max_batch]])
        finally:
            self._flights.close(flight)

    @guarded
    def Ack(self, request: apb.AckRequest, context) -> apb.AckResponse:
        self.authorize(context)
        reader = self._reader(request.group)
        cursors = []
        for i, c in enumerate(request.cursors):
            try:
                cursors.append(parse_cursor(c))
            except ValueError as exc:
                raise InvalidRequest([(f"cursors[{i}]", str(exc))]) from None
        acked = reader.ack(cursors)
        self._flights.acked(reader.group, list(request.cursors))
        return apb.AckResponse(acked=acked)

    @guarded
    def Reset(self, request: apb.ResetRequest, context) -> apb.ResetResponse:
        self.authorize(context)
        reader = self._reader(request.group)
        self.store.recheck_dataset()
        return apb.ResetResponse(streams=reader.reset())

    @guarded
    def Status(self, request: apb.StatusRequest, context) -> apb.StatusResponse:
        self.authorize(context)
        s = self._reader(request.group).status()
        return apb.StatusResponse(lag=s.lag, pending=s.pending, streams=s.streams)
