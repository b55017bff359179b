"""The archiver's Redis side (tracecode archive, archive/archiver.py): its consumer group over its
share of the audit streams, and per stream an archive hash '<stream>:archive' in the stream's own
hash tag (one slot, so one script updates both atomically):

    w  the watermark: the last entry ID written to the archive and acknowledged
    m  the first ID past it (what the stream is trimmed to: XTRIM MINID m)
    n  entries archived, ever          d  entries the hard bound dropped unarchived, ever
    f  the intent "<first> <last>": the ID range being written now (set before any file is
       written, cleared by the commit): after a crash the same range is read again with XRANGE
       and the same files are written, whatever the restarted archiver's batch size

and a list '<stream>:drops' of the ranges the bound dropped ("<first> <after> <count>", written
by lua/_audit.lua), which the archiver pops and logs.

A stream's archive is written by one archiver at a time: an archiver owns the buckets
`share(i, n)` gives it, and its consumer is named by its share, so a restarted archiver finds
its own pending entries. Two archivers given the same share would write the same files twice
(the same names, so no duplicates, but wasted work): the deployment runs one per share.

May import: the standard library, redis, and the store's own modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tracecode.rules.schema import BUCKETS

from .audit import AuditEntry, AuditReader, check_name
from .store import Store, wrap_errors


def share(index: int, count: int) -> list[int]:
    """The buckets of archiver `index` of `count` (bucket mod count == index)."""
    if not 0 <= index < count <= BUCKETS:
        raise ValueError(f"archiver share {index}/{count}: need 0 <= index < count <= {BUCKETS}")
    return [b for b in range(BUCKETS) if b % count == index]


def next_id(entry_id: str) -> str:
    """The smallest stream ID after entry_id."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class Drop:
    """Entries the hard bound dropped before they were archived: IDs from first up to (not
    including) after."""
    bucket: int
    first: str
    after: str
    count: int


@dataclass(frozen=True, slots=True)
class StreamState:
    bucket: int
    length: int          # entries in the stream now
    unarchived: int      # entries past the watermark (the archive's lag, in entries)
    oldest_ms: int       # server time of the oldest unarchived entry (0: none)
    archived: int        # n
    dropped: int         # d


class ArchiveStreams:
    """One archiver's share of the audit streams: reading, intents, commits, drops, state."""

    def __init__(self, store: Store, group: str, buckets: list[int], consumer: str):
        self.store = store
        self.r: Any = store.r
        self.group = check_name("group", group)
        self.consumer = check_name("consumer", consumer)
        self.reader = AuditReader.of(store, group, buckets=buckets)
        self.buckets = self.reader.buckets
        self.streams = dict(zip(self.reader.buckets, self.reader.streams))

    def hash_of(self, bucket: int) -> str:
        return self.streams[bucket] + ":archive"

    def drops_of(self, bucket: int) -> str:
        return self.streams[bucket] + ":drops"

    def _pipe(self):
        return self.r.pipeline(transaction=False)

    # -- reading --------------------------------------------------------------------------------

    def start(self) -> None:
        self.reader.ensure_group()

    @wrap_errors
    def intents(self) -> dict[int, tuple[str, str]]:
        """The ranges being written when the last archiver of this share stopped."""
        pipe = self._pipe()
        for b in self.buckets:
            pipe.hget(self.hash_of(b), "f")
        out = {}
        for b, f in zip(self.buckets, pipe.execute()):
            if f:
                first, last = _text(f).split()
                out[b] = (first, last)
        return out

    @wrap_errors
    def watermarks(self) -> dict[int, str]:
        """The last archived ID of each stream that has one."""
        pipe = self._pipe()
        for b in self.buckets:
            pipe.hget(self.hash_of(b), "w")
        return {b: _text(w) for b, w in zip(self.buckets, pipe.execute()) if w}

    @wrap_errors
    def set_intents(self, ranges: dict[int, tuple[str, str]]) -> None:
        pipe = self._pipe()
        for b, (first, last) in ranges.items():
            pipe.hset(self.hash_of(b), "f", f"{first} {last}")
        pipe.execute()

    @wrap_errors
    def entries(self, bucket: int, first: str, last: str) -> list[AuditEntry]:
        """The entries of a range still in the stream (an intent's, read again after a crash)."""
        return self.reader.entries_of(self.streams[bucket], self.r.xrange(self.streams[bucket], first, last))

    def commit(self, batches: dict[int, tuple[list[str], str, int]]) -> int:
        """Per bucket (ids to acknowledge, last ID written, entries written): acknowledge, move the
        watermark, trim behind it (archive_commit.lua); one round trip per node. Entries trimmed."""
        script = self.store.scripts["archive_commit"]
        calls = [(script, [self.streams[b], self.hash_of(b)], [self.group, last, next_id(last), written, *ids])
                 for b, (ids, last, written) in batches.items()]
        trimmed = 0
        for res in self.store.run_scripts(calls):
            if isinstance(res, Exception):
                raise res
            trimmed += int(res)
        return trimmed

    # -- what the bound dropped, and the state --------------------------------------------------

    @wrap_errors
    def pop_drops(self, limit: int = 100) -> list[Drop]:
        pipe = self._pipe()
        for b in self.buckets:
            pipe.lpop(self.drops_of(b), limit)
        out = []
        for b, items in zip(self.buckets, pipe.execute()):
            for item in items or ():
                first, after, count = _text(item).split()
                out.append(Drop(b, first, after, int(count)))
        return out

    @wrap_errors
    def state(self) -> list[StreamState]:
        """Per stream: length, unarchived entries (added ever - archived - dropped: exact, O(1))
        and the oldest one's server time, archived and dropped totals. Two pipelined round trips
        (one per node on a cluster)."""
        pipe = self._pipe()
        for b in self.buckets:
            pipe.xinfo_stream(self.streams[b])
            pipe.hmget(self.hash_of(b), "m", "n", "d")
        res = pipe.execute(raise_on_error=False)
        infos, hashes = res[::2], res[1::2]
        pipe = self._pipe()
        for b, (m, _, _) in zip(self.buckets, hashes):
            pipe.xrange(self.streams[b], _text(m) or "-", "+", count=1)
        firsts = pipe.execute()
        out = []
        for b, info, (_, n, d), first in zip(self.buckets, infos, hashes, firsts):
            if isinstance(info, Exception):  # no such stream yet: nothing written to this bucket
                info = {}
            archived, dropped = int(n or 0), int(d or 0)
            oldest = int(_text(first[0][0]).split("-")[0]) if first else 0
            unarchived = max(int(info.get("entries-added", 0)) - archived - dropped, 0)
            out.append(StreamState(b, int(info.get("length", 0)), unarchived, oldest, archived, dropped))
        return out


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")

