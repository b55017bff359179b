"""Small helpers shared by the rule, return, admin, race and property tests (not fixtures: those
stay in conftest.py). Everything here reads the real server or the real Redis; nothing fakes."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from tracecode.v1 import verification_pb2 as pb

# The issuer's calendar the server judges expiry in by default.
SHANGHAI = ZoneInfo("Asia/Shanghai")


def verdicts(resp) -> list[str]:
    return [pb.Verdict.Name(r.verdict) for r in resp.results]


def event_types(hist) -> list[str]:
    return [pb.EventType.Name(e.type) for e in hist.events]


def today_shanghai() -> date:
    return datetime.now(SHANGHAI).date()


def shanghai_instant(day: date, hh: int = 0, mm: int = 0, ss: int = 0, ms: int = 0) -> datetime:
    """An aware UTC datetime for a wall-clock time on `day` in Asia/Shanghai."""
    local = datetime(day.year, day.month, day.day, hh, mm, ss, ms * 1000, tzinfo=SHANGHAI)
    return local.astimezone(timezone.utc)


def iso(day: date) -> str:
    return day.isoformat()


def days(n: int) -> timedelta:
    return timedelta(days=n)


class AuditTail:
    """Every audit stream of the store's prefix, read directly; `new()` returns the events appended
    since the last call as field dicts. Entries are keyed by (stream, id): ids are per stream, so
    two buckets can hold the same id."""

    def __init__(self, store):
        self.store = store
        self.seen: set[tuple[str, str]] = set(self._all())

    def _all(self) -> dict[tuple[str, str], dict]:
        streams = self.store.keys.audit_streams()
        pipe = self.store.r.pipeline(transaction=False)
        for s in streams:
            pipe.xrange(s)
        out = {}
        for s, entries in zip(streams, pipe.execute()):
            for entry_id, fields in entries:
                out[(s, entry_id)] = fields
        return out

    def new(self) -> list[dict]:
        fresh = [(k, f) for k, f in self._all().items() if k not in self.seen]
        # Stream ids are per stream; sort by (ms, seq) for a stable, roughly temporal order.
        fresh.sort(key=lambda e: tuple(int(p) for p in e[0][1].split("-")))
        self.seen.update(k for k, _ in fresh)
        return [f for _, f in fresh]
