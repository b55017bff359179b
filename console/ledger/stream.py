"""LIVE leads: a consumer of tracecode's settlement audit streams.

The server writes every flagged attempt to the audit stream of the code's bucket
(`{prefix}:{bbbb}:audit`, keys.BUCKETS = 1024 of them; server/store/keys.py) as an entry
t=ATTEMPT, x=<verdict>, c=<canonical code>, s=<site>, i=<settlement id>, l=<line index>,
u=<units>, a=<settled_at, ms>, p=<insured pseudonym> (server/store/lua/verify.lua). The console
reads them all through one Redis Streams consumer group:

- at least once: an entry is acknowledged (XACK) only after the ledger has committed what it
  means; a consumer killed in between gets the entry again when it restarts (its own pending
  entries are read first), and a consumer that never comes back has its entries claimed by
  another after `claim_idle_ms` (XAUTOCLAIM);
- idempotent: a DUPLICATE becomes an evidence line keyed by the attempt itself (site,
  settlement, line, code), so a redelivery or a replay of the stream from the start adds nothing;
- resumes where it stopped: the group's position is kept by Redis, not by the consumer;
- lag: `tracecode_console_audit_lag` (entries not yet delivered to the group, XINFO GROUPS
  `lag`, summed over the streams) and `tracecode_console_audit_pending` (delivered, not yet
  acknowledged), on the consumer's /metrics.

On a Redis Cluster (`cluster=True`) one XREADGROUP cannot span streams of several slots: the
consumer then sends one non-blocking XREADGROUP per stream in a cluster pipeline (grouped per
node by redis-py) and polls every `poll_ms` when nothing came.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timezone

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tracecode.server.failpoints import failpoint

from .intake import ImportReport, LiveDuplicate, add_live

log = logging.getLogger("tracecode.console.stream")

BUCKETS = 1024  # tracecode.server.store.keys.BUCKETS: the number of audit streams; fixed for a data set


def audit_streams(prefix: str) -> list[str]:
    """The audit stream names, as server/store/keys.py spells them (read only: the console writes nothing there)."""
    return [f"{prefix}:{{{b:04d}}}:audit" for b in range(BUCKETS)]


@dataclass(frozen=True)
class ConsumerConfig:
    redis_url: str
    prefix: str = "tc"
    group: str = "ledger-console"
    consumer: str = ""              # default: host name (stable across restarts: own pending re-read)
    count: int = 200                # entries per read
    block_ms: int = 1000
    claim_idle_ms: int = 60_000     # take over entries a vanished consumer left unacknowledged
    max_rate: float = 0.0           # entries per second at most (0: no cap), to spare the database
    metrics_port: int = 0           # 0: no /metrics server
    metrics_addr: str = "127.0.0.1"
    cluster: bool = False           # redis_url is a node of a Redis Cluster
    poll_ms: int = 200              # cluster: the pause between reads that found nothing

    @property
    def name(self) -> str:
        return self.consumer or f"{socket.gethostname()}"


@dataclass(frozen=True)
class AuditEntry:
    stream: str
    entry_id: str
    fields: dict[str, str]

    def duplicate(self) -> LiveDuplicate | None:
        f = self.fields
        if f.get("t") != "ATTEMPT" or f.get("x") != "DUPLICATE":
            return None
        return LiveDuplicate(
            site_id=f["s"], settlement_id=f.get("i", ""), line_index=int(f.get("l") or 0),
            canonical_code=f.get("c", ""),
            settled_at=datetime.fromtimestamp(int(f["a"]) / 1000, tz=timezone.utc),
            # The pseudonym, when the server writes one (`p`): never a raw id.
            insured_pseudonym=f.get("p", ""))


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.lag = Gauge("tracecode_console_audit_lag", "Audit stream entries not yet delivered to the "
                         "console's consumer group (sum over the streams)", registry=self.registry)
        self.pending = Gauge("tracecode_console_audit_pending", "Audit stream entries delivered to the "
                             "console but not yet acknowledged", registry=self.registry)
        self.entries = Counter("tracecode_console_audit_entries", "Audit stream entries processed",
                               registry=self.registry)
        self.duplicates = Counter("tracecode_console_audit_duplicates", "DUPLICATE attempts turned into "
                                  "ledger evidence (redeliveries included)", registry=self.registry)
        self.errors = Counter("tracecode_console_audit_errors", "Rounds that failed (Redis or database "
                              "away); the entries stay pending and are read again", registry=self.registry)


class AuditConsumer:
    def __init__(self, cfg: ConsumerConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        # Both clients answer the same stream commands; Any because their stubs differ in detail.
        self.r: Any
        if cfg.cluster:
            self.r = redis.RedisCluster.from_url(cfg.redis_url, decode_responses=True, socket_timeout=10)
        else:
            self.r = redis.Redis.from_url(cfg.redis_url, decode_responses=True, socket_timeout=10)
        self.streams = audit_streams(cfg.prefix)
        self.metrics = metrics or Metrics()
        self.stopping = threading.Event()
        self._last_claim = 0.0
        self._last_lag = 0.0

    # -- setup ------------------------------------------------------------------------------

    def ensure_group(self, start_id: str = "0") -> None:
        """Create the group on every stream (from the start by default, so nothing written before
        the console's first run is missed). MKSTREAM: a bucket with no entries yet gets an empty
        stream, which the server's XADD then appends to."""
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xgroup_create(s, self.cfg.group, id=start_id, mkstream=True)
        for res in pipe.execute(raise_on_error=False):
            if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
                raise res

    def replay_from_start(self) -> None:
        """Move the group back to the start of every stream (entries are read again; idempotent)."""
        self.ensure_group()
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xgroup_setid(s, self.cfg.group, "0")
        pipe.execute()

    # -- reading ----------------------------------------------------------------------------

    def _read(self, ids: str, block: int | None) -> list[AuditEntry]:
        if self.cfg.cluster:
            return self._read_cluster(ids, block)
        reply = self.r.xreadgroup(self.cfg.group, self.cfg.name, {s: ids for s in self.streams},
                                  count=self.cfg.count, block=block)
        # An entry trimmed away while pending comes back without fields: it is acknowledged
        # (nothing left to learn from it) rather than read again forever.
        return [AuditEntry(stream, eid, fields or {}) for stream, entries in (reply or []) for eid, fields in entries]

    def _read_cluster(self, ids: str, block: int | None) -> list[AuditEntry]:
        deadline = time.monotonic() + (block or 0) / 1000
        while True:
            pipe = self.r.pipeline(transaction=False)
            for s in self.streams:
                pipe.xreadgroup(self.cfg.group, self.cfg.name, {s: ids}, count=self.cfg.count)
            out = [AuditEntry(stream, eid, fields or {}) for reply in pipe.execute()
                   for stream, entries in (reply or []) for eid, fields in entries]
            if out or not block or time.monotonic() >= deadline or self.stopping.is_set():
                return out
            time.sleep(self.cfg.poll_ms / 1000)

    def _claim(self) -> list[AuditEntry]:
        """Entries other (vanished) consumers of the group left unacknowledged for claim_idle_ms."""
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xautoclaim(s, self.cfg.group, self.cfg.name, self.cfg.claim_idle_ms, "0-0", count=self.cfg.count)
        out: list[AuditEntry] = []
        for s, res in zip(self.streams, pipe.execute()):
            out.extend(AuditEntry(s, eid, fields or {}) for eid, fields in res[1])
        return out

    def handle(self, entries: list[AuditEntry]) -> ImportReport:
        """Commit what the entries mean, then acknowledge them (never the other way round)."""
        report = ImportReport()
        for e in entries:
            dup = e.duplicate()
            if dup is not None:
                add_live([dup], report)  # one transaction per attempt
                self.metrics.duplicates.inc()
            self.metrics.entries.inc()
            if self.cfg.max_rate:
                time.sleep(1.0 / self.cfg.max_rate)
        failpoint("console_before_ack")
        pipe = self.r.pipeline(transaction=False)
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.entry_id)
        for s, ids in by_stream.items():
            pipe.xack(s, self.cfg.group, *ids)
        pipe.execute()
        return report

    def update_lag(self) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=False)
        for s in self.streams:
            pipe.xinfo_groups(s)
        lag = pending = 0
        for groups in pipe.execute(raise_on_error=False):
            if isinstance(groups, Exception):
                continue
            for g in groups:
                if g["name"] == self.cfg.group:
                    # lag is None when Redis cannot tell (entries deleted mid-range): count it as unknown (0).
                    lag += int(g.get("lag") or 0)
                    pending += int(g.get("pending") or 0)
        self.metrics.lag.set(lag)
        self.metrics.pending.set(pending)
        return lag, pending

    def run_once(self, block_ms: int | None = None) -> int:
        """One round: own pending entries first (after a restart), claims now and then, new ones."""
        now = time.monotonic()
        entries = self._read("0", None)  # delivered to this consumer before and never acknowledged
        if not entries and now - self._last_claim > self.cfg.claim_idle_ms / 1000 / 2:
            self._last_claim = now
            entries = self._claim()
        if not entries:
            entries = self._read(">", self.cfg.block_ms if block_ms is None else block_ms)
        if entries:
            self.handle(entries)
        if now - self._last_lag > 1.0 or not entries:
            self._last_lag = now
            self.update_lag()
        return len(entries)

    def run(self) -> None:
        from django.db import close_old_connections
        if self.cfg.metrics_port:
            start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_addr, registry=self.metrics.registry)
        self.ensure_group()
        log.warning("audit consumer %s of group %s on %d streams", self.cfg.name, self.cfg.group, len(self.streams))
        while not self.stopping.is_set():
            try:
                self.run_once()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.metrics.errors.inc()
                log.warning("audit stream unreachable (%s); retrying", exc)
                self.stopping.wait(1.0)
            except Exception:
                # A database failure: nothing was acknowledged, the entries come again next round.
                self.metrics.errors.inc()
                log.exception("audit round failed; entries stay pending")
                close_old_connections()
                self.stopping.wait(1.0)
