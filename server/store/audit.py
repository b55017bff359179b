"""The audit streams, read through Redis Streams consumer groups: the store-level reader behind
the AuditFeed service (server/api/audit.py), for the ledger console's group and any other reader
of its own group (an archiver).

The scripts write every state change and flagged attempt to the audit stream of the code's
bucket (`KeySpace.audit_streams()`, BUCKETS of them; entry fields by letter in
`tracecode.rules.schema.AUDIT_FIELDS`). A reader names a consumer group; the group keeps its
position in Redis, so a reader resumes where its group stopped, and each entry stays pending for
the consumer it was delivered to until acknowledged:

- `AuditReader`: the Redis commands over every stream of one group (create, reset, own pending,
  claim, new, acknowledge, lag), on a single redis-server (one XREADGROUP spans the streams) and
  on Redis Cluster (one XREADGROUP per stream in a cluster pipeline, grouped per node by
  redis-py, polled: a blocking read cannot span slots);
- `Follower`: one consumer's reading order over a reader, one read at a time, at least once:
  its own pending entries first (what a killed reader received and never acknowledged), then
  entries other consumers left idle past claim_idle_ms, then new ones; and no further read while
  anything of the previous one is still pending (acknowledged through `AuditReader.ack`).

An entry is named outside the store by an opaque cursor "<bucket>/<entry id>" (`cursor_of`,
`parse_cursor`): readers never learn the key layout.

May import: the standard library, redis, and the store's own modules. Never grpc or the API.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from tracecode.rules.schema import AUDIT_FIELDS, BUCKETS

from .keys import KeySpace
from .store import wrap_errors

# A group or consumer name: the alphabet of identities (no spaces, nothing Redis would split on).
NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}\Z")
_CURSOR = re.compile(r"(\d{1,5})/(\d{1,20}-\d{1,20})\Z")
# The longest a single blocking read waits: below the store's socket timeout (2 s by default), so
# a quiet stream is never mistaken for a dead connection.
MAX_BLOCK_MS = 1000


def cursor_of(bucket: int, entry_id: str) -> str:
    return f"{bucket}/{entry_id}"


def parse_cursor(text: str) -> tuple[int, str]:
    """(bucket, entry id) of a cursor; ValueError saying what is wrong."""
    m = _CURSOR.match(text)
    if not m or int(m.group(1)) >= BUCKETS:
        raise ValueError(f"{text[:80]!r} is not an audit cursor (<bucket 0-{BUCKETS - 1}>/<entry id>, as delivered)")
    return int(m.group(1)), m.group(2)


def check_name(what: str, name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"{what} {name[:80]!r}: must be 1-64 of A-Z a-z 0-9 . _ -")
    return name


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit stream entry: fields by AUDIT_FIELDS letter; empty when the entry was trimmed
    away (MAXLEN) while pending: nothing left to learn from it but its acknowledgement."""
    bucket: int
    entry_id: str
    fields: dict[str, str]

    @property
    def cursor(self) -> str:
        return cursor_of(self.bucket, self.entry_id)

    def get(self, letter: str, default: str = "") -> str:
        assert letter in AUDIT_FIELDS, letter  # a misspelt letter is a bug, not an absent field
        return self.fields.get(letter, default)


@dataclass(frozen=True, slots=True)
class GroupStatus:
    lag: int      # entries not yet delivered to the group (every entry, for a group not created yet)
    pending: int  # delivered to a consumer of the group, not acknowledged
    streams: int


class AuditReader:
    """The Redis commands of one consumer group over every audit stream of a key space."""

    def __init__(self, client: Any, keys: KeySpace, group: str, *, cluster: bool = False, observer=None,
                 poll_ms: int = 200, buckets: list[int] | None = None):
        # Any: redis.Redis and RedisCluster answer the same stream commands; their stubs differ in detail.
        self.r = client
        self.keys = keys
        self.group = check_name("group", group)
        self.cluster = cluster
        self.observer = observer  # wrap_errors reports each operation to it (the store's metrics)
        self.poll_ms = poll_ms    # cluster: the pause between reads that found nothing
        # buckets: the streams this reader covers (an archiver's share, server/store/archive.py); all by default.
        every = keys.audit_streams()
        self.buckets = list(range(len(every))) if buckets is None else sorted(set(buckets))
        self.streams = [every[b] for b in self.buckets]
        self._bucket = {s: b for b, s in zip(self.buckets, self.streams)}
        self._stream = {b: s for s, b in self._bucket.items()}

    @classmethod
    def of(cls, store, group: str, **kw) -> "AuditReader":
        """A reader over the store's Redis and key space."""
        return cls(store.r, store.keys, group, cluster=store.cluster, observer=store.observer, **kw)

    def entries_of(self, stream: str, entries) -> list[AuditEntry]:
        """A stream's entries as Redis gave them (XREADGROUP, XRANGE), as AuditEntry."""
        b = self._bucket[stream]
        return [AuditEntry(b, eid, fields or {}) for eid, fields in entries or ()]

    # -- the group ------------------------------------------------------------------------------

    @wrap_errors
    def ensure_group(self) -> None:
        """Create the group on every stream, at its start (nothing written before a reader's first
        run is missed). MKSTREAM: a bucket without entries yet gets an empty stream, which the
        scripts' XADD then appends to. A group that exists already is left where it is."""
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xgroup_create(s, self.group, id="0", mkstream=True)
        for res in pipe.execute(raise_on_error=False):
            if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
                raise res

    @wrap_errors
    def reset(self) -> int:
        """Move the group back to the start of every stream: every kept entry is delivered again
        (readers are idempotent). Pending entries stay pending."""
        self.ensure_group()
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            # ENTRIESREAD 0: Redis then still knows the group's lag (all of the stream) instead
            # of reporting it unknown until the group has caught up.
            pipe.xgroup_setid(s, self.group, "0", entries_read=0)
        pipe.execute()
        return len(self.streams)

    # -- reading --------------------------------------------------------------------------------

    def _read(self, consumer: str, ids: str, count: int, block_ms: int | None) -> list[AuditEntry]:
        if self.cluster:
            return self._read_cluster(consumer, ids, count, block_ms)
        reply = self.r.xreadgroup(self.group, consumer, {s: ids for s in self.streams}, count=count,
                                  block=block_ms)
        return [e for stream, entries in (reply or []) for e in self.entries_of(stream, entries)]

    def _read_cluster(self, consumer: str, ids: str, count: int, block_ms: int | None) -> list[AuditEntry]:
        deadline = time.monotonic() + (block_ms or 0) / 1000
        while True:
            pipe = self.r.pipeline(transaction=False)
            for s in self.streams:
                pipe.xreadgroup(self.group, consumer, {s: ids}, count=count)
            out = [e for reply in pipe.execute() for stream, entries in (reply or [])
                   for e in self.entries_of(stream, entries)]
            if out or not block_ms or time.monotonic() >= deadline:
                return out
            time.sleep(min(self.poll_ms / 1000, max(deadline - time.monotonic(), 0)))

    @wrap_errors
    def pending(self, consumer: str, count: int) -> list[AuditEntry]:
        """Entries delivered to `consumer` and not acknowledged (up to `count` per stream), oldest
        first per stream."""
        return self._read(consumer, "0", count, None)

    @wrap_errors
    def new(self, consumer: str, count: int, block_ms: int) -> list[AuditEntry]:
        """Entries never delivered to the group (up to `count` per stream), now pending for
        `consumer`; waits up to block_ms (at most MAX_BLOCK_MS) when there are none."""
        return self._read(consumer, ">", count, min(block_ms, MAX_BLOCK_MS) or None)

    @wrap_errors
    def claim(self, consumer: str, min_idle_ms: int, count: int) -> list[AuditEntry]:
        """Entries any consumer of the group left unacknowledged for min_idle_ms, now `consumer`'s
        (XAUTOCLAIM; up to `count` per stream)."""
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xautoclaim(s, self.group, consumer, min_idle_ms, "0-0", count=count)
        out: list[AuditEntry] = []
        for s, res in zip(self.streams, pipe.execute(raise_on_error=False)):
            if isinstance(res, Exception):
                if "NOGROUP" in str(res):  # a stream made after the group: nothing to claim there
                    continue
                raise res
            out.extend(self.entries_of(s, res[1]))
        return out

    @wrap_errors
    def ack(self, cursors: list[tuple[int, str]]) -> int:
        """Acknowledge entries by (bucket, entry id); the number that were pending."""
        by_stream: dict[str, list[str]] = {}
        for bucket, eid in cursors:
            by_stream.setdefault(self._stream[bucket], []).append(eid)
        pipe = self.r.pipeline(transaction=False)
        for s, ids in by_stream.items():
            pipe.xack(s, self.group, *ids)
        done = 0
        for res in pipe.execute(raise_on_error=False):
            if isinstance(res, Exception):
                if "NOGROUP" in str(res):  # nothing was delivered there through this group
                    continue
                raise res
            done += int(res)
        return done

    @wrap_errors
    def status(self) -> GroupStatus:
        """The group's lag and pending count, summed over the streams. Where the group does not
        exist yet, every entry of the stream is lag (it would be read from the start)."""
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xinfo_groups(s)
            pipe.xlen(s)
        res = pipe.execute(raise_on_error=False)
        lag = pending = 0
        for groups, length in zip(res[::2], res[1::2]):
            if isinstance(length, Exception):
                raise length
            mine = [] if isinstance(groups, Exception) else [g for g in groups if g["name"] == self.group]
            if not mine:  # no such stream yet ("no such key"), or no such group on it
                lag += int(length or 0)
                continue
            # lag is None when Redis cannot tell (entries deleted mid-range): counted as 0.
            lag += int(mine[0].get("lag") or 0)
            pending += int(mine[0].get("pending") or 0)
        return GroupStatus(lag, pending, len(self.streams))


class Follower:
    """One consumer's reading order over an AuditReader, one read at a time, at least once.

    `next(block_ms)` gives the consumer's own pending entries first (what a killed reader was
    given and never acknowledged), then (every claim_idle_ms / 2 at most) entries idle past
    claim_idle_ms, then new entries: whatever one read returns, up to `per_stream` entries of each
    stream. It answers None while any entry it gave last is still pending: the caller waits for
    their acknowledgement (AuditReader.ack, from anywhere) and asks again. Nothing is held back
    from a read: leftovers would be read again, at a cost, on every round after."""

    def __init__(self, reader: AuditReader, consumer: str, *, per_stream: int = 200, claim_idle_ms: int = 60_000):
        self.reader = reader
        self.consumer = check_name("consumer", consumer)
        self.per_stream = per_stream
        self.claim_idle_ms = claim_idle_ms
        self.in_flight: frozenset[str] = frozenset()
        self._last_claim = -float("inf")

    def next(self, block_ms: int) -> list[AuditEntry] | None:
        own = self.reader.pending(self.consumer, self.per_stream)
        if self.in_flight and any(e.cursor in self.in_flight for e in own):
            return None
        batch = own
        now = time.monotonic()
        if not batch and now - self._last_claim > self.claim_idle_ms / 1000 / 2:
            self._last_claim = now
            batch = self.reader.claim(self.consumer, self.claim_idle_ms, self.per_stream)
        if not batch:
            batch = self.reader.new(self.consumer, self.per_stream, block_ms)
        self.in_flight = frozenset(e.cursor for e in batch)
        return batch
