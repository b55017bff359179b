"""LIVE leads: the console's reader of tracecode's audit feed.

The server writes every flagged attempt to its audit streams and serves them through the
AuditFeed gRPC service (proto/tracecode/v1/audit.proto; admin identities only), read through a
named consumer group (`ledger-console` by default) whose position the server keeps. The console
reads no Redis: it knows events, cursors and its group, not keys or streams.

- at least once: an event is acknowledged (Ack) only after the ledger has committed what it
  means; a consumer killed in between gets the event again when it restarts (the feed delivers
  a consumer's own unacknowledged events first), and a consumer that never comes back has its
  events handed to another after `claim_idle_ms`;
- idempotent: a DUPLICATE becomes an evidence line keyed by the attempt itself (site,
  settlement, line, code), so a redelivery or a replay from the start adds nothing;
- alerts: every flagged attempt, refusal and notice is also kept for the pharmacy whose counter
  raised it to answer (alerts.py), keyed by the event's identity likewise;
- resumes where it stopped: the group's position is kept by the server, not by the consumer;
- lag: `tracecode_console_audit_lag` (events not yet delivered to the group) and
  `tracecode_console_audit_pending` (delivered, not yet acknowledged), from the feed's Status,
  on the consumer's /metrics.

The feed sends a batch, then the next only once this one is acknowledged; an empty batch is a
heartbeat (nothing new within block_ms). After a failure (service away, database away) the
consumer drops its Watch and opens a new one: what it had not acknowledged comes first again.

May import: Django, grpc, prometheus_client, tracecode.clients (the feed's client), the
generated stubs, tracecode.server.failpoints, and the ledger app. Never redis or the server's
store and API.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tracecode.clients.audit import AuditFeedClient
from tracecode.server.failpoints import failpoint
from tracecode.v1 import audit_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

from . import alerts
from .gateway import channel_credentials
from .intake import ImportReport, LiveDuplicate, add_live

log = logging.getLogger("tracecode.console.stream")


@dataclass(frozen=True)
class ConsumerConfig:
    server: str                     # the tracecode server (host:port), as TRACECODE_CONSOLE_SERVER
    group: str = "ledger-console"
    consumer: str = ""              # default: host name (stable across restarts: own pending re-read)
    count: int = 200                # events per batch at most
    block_ms: int = 1000            # a heartbeat after this long without events (at most 1000)
    claim_idle_ms: int = 60_000     # take over events a vanished consumer left unacknowledged
    max_rate: float = 0.0           # events per second at most (0: no cap), to spare the database
    metrics_port: int = 0           # 0: no /metrics server
    metrics_addr: str = "127.0.0.1"
    tls_ca: str = ""                # CA of the server's certificate: connect with TLS
    tls_cert: str = ""              # client certificate naming admin:<name> (auth = mtls)
    tls_key: str = ""
    token_file: str = ""            # bearer token of an admin identity (auth = token)
    timeout_s: float = 10.0         # Ack, Reset and Status deadlines

    @property
    def name(self) -> str:
        return self.consumer or f"{socket.gethostname()}"


def connect(cfg: ConsumerConfig) -> AuditFeedClient:
    """The feed's client with the configured credentials (TLS, mTLS, bearer token), as the
    console's other clients make them (gateway.py). OSError, ValueError: a file is unreadable."""
    metadata: tuple[tuple[str, str], ...] = ()
    if cfg.token_file:
        with open(cfg.token_file, encoding="ascii") as fh:
            metadata = (("authorization", f"Bearer {fh.read().strip()}"),)
    return AuditFeedClient(cfg.server, credentials=channel_credentials(cfg.tls_ca, cfg.tls_cert, cfg.tls_key),
                           metadata=metadata, timeout_s=cfg.timeout_s)


def duplicate(e: apb.AuditEvent) -> LiveDuplicate | None:
    """The ledger's view of a DUPLICATE attempt; None for any other event."""
    if e.type != apb.AUDIT_ATTEMPT or e.verdict != pb.DUPLICATE:
        return None
    return LiveDuplicate(
        site_id=e.site_id, settlement_id=e.settlement_id, line_index=e.line_index,
        canonical_code=e.canonical_code, settled_at=e.at.ToDatetime(tzinfo=timezone.utc),
        # The server's pseudonym, when the settlement named a person: never a raw id.
        insured_pseudonym=e.insured_pseudonym)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.lag = Gauge("tracecode_console_audit_lag", "Audit events not yet delivered to the "
                         "console's consumer group (sum over the streams)", registry=self.registry)
        self.pending = Gauge("tracecode_console_audit_pending", "Audit events delivered to the "
                             "console but not yet acknowledged", registry=self.registry)
        self.entries = Counter("tracecode_console_audit_entries", "Audit events processed",
                               registry=self.registry)
        self.duplicates = Counter("tracecode_console_audit_duplicates", "DUPLICATE attempts turned into "
                                  "ledger evidence (redeliveries included)", registry=self.registry)
        self.alerts = Counter("tracecode_console_audit_alerts", "Counter alerts kept for pharmacies to "
                              "answer (flagged attempts, refusals, notices; redeliveries included)",
                              registry=self.registry)
        self.errors = Counter("tracecode_console_audit_errors", "Rounds that failed (service or database "
                              "away); the events stay pending and come again", registry=self.registry)


class AuditConsumer:
    def __init__(self, cfg: ConsumerConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        self.feed = connect(cfg)
        self.metrics = metrics or Metrics()
        self.stopping = threading.Event()
        self._watch: Any = None  # the open Watch call (an iterator of batches that can be cancelled)
        self._last_lag = 0.0

    def close(self) -> None:
        self.drop_watch()
        self.feed.close()

    def replay_from_start(self) -> None:
        """Move the group back to the start of the feed (events come again; idempotent)."""
        self.feed.reset(self.cfg.group)

    def update_lag(self) -> tuple[int, int]:
        lag, pending = self.feed.status(self.cfg.group)
        self.metrics.lag.set(lag)
        self.metrics.pending.set(pending)
        return lag, pending

    def drop_watch(self) -> None:
        """End the open Watch: the next round opens another, which delivers what this consumer
        has not acknowledged first."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _batches(self, block_ms: int) -> Iterator[apb.AuditEventBatch]:
        if self._watch is None:
            self._watch = self.feed.watch(self.cfg.group, self.cfg.name, max_batch=self.cfg.count,
                                          block_ms=block_ms, claim_idle_ms=self.cfg.claim_idle_ms)
        return self._watch

    def handle(self, events: list[apb.AuditEvent]) -> ImportReport:
        """Commit what the events mean, then acknowledge them (never the other way round)."""
        report = ImportReport()
        for e in events:
            dup = duplicate(e)
            if dup is not None:
                add_live([dup], report)  # one transaction per attempt
                self.metrics.duplicates.inc()
            # Every alert of a counter, for its pharmacy to answer (alerts.py; after add_live, so
            # a DUPLICATE's alert finds its lead).
            if alerts.record(e) is not None:
                self.metrics.alerts.inc()
            self.metrics.entries.inc()
            if self.cfg.max_rate:
                time.sleep(1.0 / self.cfg.max_rate)
        failpoint("console_before_ack")
        self.feed.ack(self.cfg.group, [e.cursor for e in events])
        return report

    def run_once(self, block_ms: int | None = None) -> int:
        """One batch (or a heartbeat) from the feed, committed then acknowledged; the number of
        events. block_ms applies when this round opens the Watch."""
        try:
            batch = next(self._batches(self.cfg.block_ms if block_ms is None else block_ms))
        except StopIteration:  # the server ended the call (it stops): the next round reconnects
            self._watch = None
            return 0
        except grpc.RpcError:
            self.drop_watch()
            raise
        events = list(batch.events)
        try:
            if events:
                self.handle(events)
        except BaseException:
            self.drop_watch()  # unacknowledged: they come again, first, on the next Watch
            raise
        now = time.monotonic()
        if now - self._last_lag > 1.0 or not events:
            self._last_lag = now
            self.update_lag()
        return len(events)

    def run(self) -> None:
        from django.db import close_old_connections
        if self.cfg.metrics_port:
            start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_addr, registry=self.metrics.registry)
        log.warning("audit consumer %s of group %s on %s", self.cfg.name, self.cfg.group, self.cfg.server)
        while not self.stopping.is_set():
            try:
                self.run_once()
            except grpc.RpcError as exc:
                self.metrics.errors.inc()
                log.warning("audit feed unavailable (%s: %s); retrying", exc.code().name, exc.details())
                self.stopping.wait(1.0)
            except Exception:
                # A database failure: nothing was acknowledged, the events come again next round.
                self.metrics.errors.inc()
                log.exception("audit round failed; events stay pending")
                close_old_connections()
                self.stopping.wait(1.0)
        self.close()
