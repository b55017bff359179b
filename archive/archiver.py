"""`tracecode archive`: one archiver process over its share of the audit streams (docs/archive.md).

Per stream, entries are gathered in memory (they stay pending in Redis for this archiver's
consumer) until `file_entries` of them or `max_delay_s` has passed; then the stream's range is
flushed, in this order, each step surviving a kill -9 at any point:

 1. the intent: the range "<first> <last>" in the stream's archive hash (Redis);
 2. one Parquet file per settlement date, named by the range, written and renamed into place;
 3. the commit (archive_commit.lua): acknowledge, move the watermark, trim the stream behind it,
    clear the intent, in one script.

A restarted archiver first finishes every intent left behind: it reads the range again (XRANGE),
writes the files not already there (same names: an existing file is complete, rename is
atomic) and commits. Then its own pending entries, then new ones. Every entry is in exactly
one file, named by its stream's range; nothing is acknowledged before its file exists.

May import: the standard library, prometheus_client, the server's failpoints and store (never
redis itself), and this room's dataset.
"""
from __future__ import annotations

import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from tracecode.server.failpoints import failpoint
from tracecode.server.store.archive import ArchiveStreams, id_key
from tracecode.server.store.audit import AuditEntry

from .dataset import Archive, Days, file_name, split_by_date

log = logging.getLogger("tracecode.archive")

ARCHIVED = Counter("tracecode_archive_entries_total", "audit entries written to the archive")
FILES = Counter("tracecode_archive_files_total", "Parquet files written")
BYTES = Counter("tracecode_archive_bytes_total", "Parquet bytes written")
BUFFERED = Gauge("tracecode_archive_buffered_entries", "entries read and not yet written (pending for this archiver)")
LAG = Gauge("tracecode_archive_lag_entries", "unarchived entries in this archiver's streams, all streams")
LAG_MAX = Gauge("tracecode_archive_stream_lag_max_entries", "unarchived entries of the most behind stream")
OLDEST = Gauge("tracecode_archive_oldest_unarchived_age_seconds", "age of the oldest unarchived entry")
STREAM_LEN = Gauge("tracecode_archive_stream_entries", "entries held in Redis by this archiver's streams")
DROPPED = Gauge("tracecode_archive_guard_dropped_entries", "entries the hard bound dropped unarchived, ever "
                                                          "(from Redis: survives restarts)")
DROP_EVENTS = Counter("tracecode_archive_guard_trims_total", "hard-bound trims logged by this archiver")
BOUND = Gauge("tracecode_archive_bound_entries", "the servers' audit_archive_bound as this archiver was told it "
                                               "(0: none)")
LAST_COMMIT = Gauge("tracecode_archive_last_commit_timestamp_seconds", "when this archiver last committed")
ERRORS = Counter("tracecode_archive_errors_total", "rounds that failed (Redis or storage) and were retried")


@dataclass
class Settings:
    file_entries: int = 20_000   # a stream's file is written at this many entries...
    max_delay_s: float = 60.0    # ... or once its oldest buffered entry waited this long
    per_stream: int = 1_000      # entries read per stream per read
    block_ms: int = 500
    status_every_s: float = 10.0
    writers: int = 8             # files written at once (threads)


class Archiver:
    def __init__(self, streams: ArchiveStreams, archive: Archive, timezone: str, settings: Settings | None = None):
        self.streams = streams
        self.archive = archive
        self.days = Days(timezone)
        self.s = settings or Settings()
        self.buffers: dict[int, list[AuditEntry]] = {}
        self.since: dict[int, float] = {}  # monotonic time a stream's buffer got its first entry
        self.stopping = False
        self._status_at = 0.0
        self.pool = ThreadPoolExecutor(self.s.writers, thread_name_prefix="archive-writer")
        self._touched: set[str] = set()

    # -- one stream's range ---------------------------------------------------------------------

    def _write_range(self, bucket: int, first: str, last: str, entries: list[AuditEntry], *,
                     recovering: bool) -> int:
        """The range's files, one per date; entries written. Recovering, a file already there
        is complete (renamed whole) and is kept as it is. The partition folders are synced by
        the caller (`_write_all`), once, before any of the range is committed."""
        rows = split_by_date(bucket, [(e.entry_id, e.fields) for e in entries if e.fields], self.days)
        name = file_name(bucket, first, last)
        written = 0
        for day, part in sorted(rows.items()):
            path = f"{self.archive.partition(day)}/{name}"
            written += len(part)
            if recovering and self.archive.exists(path):
                continue
            size = self.archive.write(path, part.table(), before_rename=lambda: failpoint("archive_before_rename"),
                                      sync_dir=False)
            self._touched.add(self.archive.partition(day))
            FILES.inc()
            BYTES.inc(size)
        return written

    def _write_all(self, ranges: dict[int, tuple[str, str, list[AuditEntry]]], *, recovering: bool) -> dict[int, int]:
        """Every range's files, by a pool of writer threads (a file's cost is mostly its fsyncs,
        which wait on the disk outside the GIL), then one sync per partition folder touched.
        Entries written per bucket. Any failure raises before anything is committed."""
        self._touched = set()
        futures = {b: self.pool.submit(self._write_range, b, first, last, es, recovering=recovering)
                   for b, (first, last, es) in ranges.items()}
        written = {b: f.result() for b, f in futures.items()}
        self.archive.sync(self._touched)
        return written

    def recover(self) -> int:
        """Finish the ranges a stopped archiver of this share left between intent and commit."""
        ranges = {bucket: (first, last, self.streams.entries(bucket, first, last))
                  for bucket, (first, last) in self.streams.intents().items()}
        written = self._write_all(ranges, recovering=True)
        done = {}
        for bucket, (first, last, entries) in ranges.items():
            done[bucket] = ([e.entry_id for e in entries], last, written[bucket])
            log.info("archive: finished the range %s..%s of stream %d (%d entries) left by a stopped archiver",
                     first, last, bucket, written[bucket])
        if done:
            self.streams.commit(done)
            ARCHIVED.inc(sum(w for _, _, w in done.values()))
        return len(done)

    def flush(self, buckets: list[int]) -> int:
        batches = {b: self.buffers[b] for b in buckets if self.buffers.get(b)}
        if not batches:
            return 0
        ranges = {b: (es[0].entry_id, es[-1].entry_id) for b, es in batches.items()}
        self.streams.set_intents(ranges)
        written = self._write_all({b: (*ranges[b], es) for b, es in batches.items()}, recovering=False)
        commits = {b: ([e.entry_id for e in es], ranges[b][1], written[b]) for b, es in batches.items()}
        failpoint("archive_before_commit")
        self.streams.commit(commits)
        total = sum(w for _, _, w in commits.values())
        ARCHIVED.inc(total)
        LAST_COMMIT.set_to_current_time()
        for b in batches:
            self.buffers.pop(b, None)
            self.since.pop(b, None)
        BUFFERED.set(sum(map(len, self.buffers.values())))
        return total

    # -- the loop -------------------------------------------------------------------------------

    def take(self, entries: list[AuditEntry]) -> None:
        now = time.monotonic()
        for e in entries:
            buf = self.buffers.setdefault(e.bucket, [])
            if buf and id_key(buf[-1].entry_id) >= id_key(e.entry_id):
                continue  # delivered twice (own pending read again): already buffered
            if not buf:
                self.since[e.bucket] = now
            buf.append(e)
        BUFFERED.set(sum(map(len, self.buffers.values())))

    def due(self, *, everything: bool = False) -> list[int]:
        now = time.monotonic()
        return [b for b, buf in self.buffers.items() if buf and (
            everything or len(buf) >= self.s.file_entries or now - self.since[b] >= self.s.max_delay_s)]

    def status(self) -> None:
        states = self.streams.state()
        now_ms = time.time() * 1000
        LAG.set(sum(s.unarchived for s in states))
        LAG_MAX.set(max((s.unarchived for s in states), default=0))
        oldest = min((s.oldest_ms for s in states if s.oldest_ms and s.unarchived), default=0)
        OLDEST.set(max(now_ms - oldest, 0) / 1000 if oldest else 0)
        STREAM_LEN.set(sum(s.length for s in states))
        DROPPED.set(sum(s.dropped for s in states))
        for d in self.streams.pop_drops():
            DROP_EVENTS.inc()
            log.error("archive: the hard bound (audit_archive_bound) dropped %d unarchived entries of stream %d, IDs "
                      "%s up to (not including) %s: they are not in the archive", d.count, d.bucket, d.first, d.after)

    def start(self) -> None:
        self.streams.start()
        self.recover()
        self.take(self.streams.reader.pending(self.streams.consumer, 10_000_000))

    def run_once(self) -> int:
        # New entries only: own pending ones were taken at start (re-reading them every round
        # would cost the whole buffer each time).
        self.take(self.streams.reader.new(self.streams.consumer, self.s.per_stream, self.s.block_ms))
        n = self.flush(self.due(everything=self.stopping))
        if time.monotonic() - self._status_at >= self.s.status_every_s:
            self._status_at = time.monotonic()
            self.status()
        return n

    def round(self, *, pause_s: float = 1.0) -> int | None:
        """One round that survives a failure: Redis restarting or the storage failing a write
        (an S3 endpoint answering 500 to a multipart upload) costs a pause and a restart from
        the intents and own pending entries; nothing was acknowledged, so nothing is lost and
        the same files are written again. Entries archived, or None after a failure."""
        try:
            return self.run_once()
        except Exception as exc:
            ERRORS.inc()
            log.warning("archive: round failed, retrying: %s", exc)
            time.sleep(pause_s)
            self._restart()
            return None

    def run(self) -> int:
        """Until SIGTERM/SIGINT; then what is buffered is flushed before exit."""
        def stop(signum, _frame):
            log.info("archive: signal %d: flushing and stopping", signum)
            self.stopping = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.start()
        while not self.stopping:
            self.round()
        self.flush(self.due(everything=True))
        self.status()
        return 0

    def _restart(self) -> None:
        """After a failure: drop what is buffered (it stays pending in Redis) and begin again from
        the intents and own pending entries, the same path as a new process."""
        self.buffers.clear()
        self.since.clear()
        try:
            self.start()
        except Exception as exc:
            log.warning("archive: restart failed, retrying: %s", exc)


def consumer_name(index: int, count: int) -> str:
    return f"archiver-{index}-of-{count}"

