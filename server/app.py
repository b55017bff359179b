"""Runs the service: `tracecode serve` in one process (or, with --workers, under workers.py's
supervisor): logging, metrics HTTP, security settings, the embedded Redis when no URL is given,
the store, the gRPC server (api/server.py), and graceful shutdown on SIGTERM/SIGINT.

May import: every package of tracecode.server (it assembles them); it speaks neither gRPC nor
Redis itself.
"""
from __future__ import annotations

import gc
import logging
import signal
import sys
import threading

from tracecode import __version__, codec
from tracecode.rules.pseudonym import Pseudonymizer

from . import metrics, workers
from .api import auth
from .api.server import Server
from .config import Config
from .errors import DataSetMismatch
from .logs import setup_logging
from .sanction_service import resolve_key_file
from .store import (DataSetMarker, EmbeddedRedis, KeySpace, PruneSummary, Store, StoreLimits, now_ms,
                    prune_expired as _prune)
from .verifier import Verifier

log = logging.getLogger("tracecode.server")

__all__ = ["Server", "make_store", "prune_expired", "serve", "setup_logging"]


def make_store(config: Config, url: str) -> Store:
    limits = StoreLimits(audit_max=config.audit_max, audit_bound=config.audit_archive_bound,
                         history_max=config.history_max,
                         settlement_ttl_s=config.settlement_ttl_days * 86400,
                         reservation_ms=int(config.reservation_s * 1000),
                         min_replicas_acked=config.min_replicas_acked,
                         replica_ack_timeout_ms=config.replica_ack_timeout_ms)
    # A WAIT for replicas must end (and answer UNAVAILABLE) before the socket gives up on it.
    timeout_s = max(config.redis_timeout_s,
                    config.replica_ack_timeout_ms / 1000 + 0.5 if config.min_replicas_acked else 0)
    return Store.from_url(url, timeout_s=timeout_s, max_connections=config.threads * 2 + 4,
                          keys=KeySpace(config.key_prefix, code_buckets=config.code_buckets),
                          limits=limits, cluster=config.redis_cluster, observer=metrics.observe_store)


def _offline(config: Config, job):
    """Run job(store) against --redis-url, or against the embedded Redis of config.data_dir (started
    and stopped here: `tracecode serve` must not be running on that data directory)."""
    embedded = None
    url = auth.redis_url(config, config.redis_url) if config.redis_url else ""
    if not url:
        embedded = EmbeddedRedis(config.data_dir, appendfsync=config.redis_appendfsync).start()
        url = embedded.url
    store = make_store(config, url)
    try:
        return job(store)
    finally:
        store.close()
        if embedded:
            embedded.stop()


def prune_expired(config: Config, cutoff_day: int | None = None, progress=None, *, force: bool = False,
                  dry_run: bool = False) -> PruneSummary:
    """`tracecode prune-expired`: drop packs that expired before cutoff_day (default: today in the
    issuer's calendar minus the return window), store/prune.py. Safe beside running servers.

    A cutoff after today is refused unless forced: it would drop packs that have not expired and
    can still be sold (they would then scan UNKNOWN). `dry_run` counts what would go and drops
    nothing."""
    if cutoff_day is not None and not 19000101 <= cutoff_day <= 99991231:
        raise ValueError(f"cutoff day {cutoff_day}: must be YYYYMMDD")

    def job(store: Store) -> PruneSummary:
        # The data set must be the one this configuration describes (store/marker.py); the key's
        # fields are compared when a key file is configured (pruning itself needs no key).
        key = Pseudonymizer.from_file(config.pseudonym_key_file) if config.pseudonym_key_file else None
        store.open_dataset(DataSetMarker(config.code_buckets, key.key_id if key else "",
                                         key.fingerprint() if key else ""), create=False)
        # Days in the issuer's calendar, as the verifier dates a settlement.
        verifier = Verifier(store, config)
        today = verifier.settle_day(now_ms())
        window_ms = int(config.return_window_days * 86_400_000)
        default = verifier.settle_day(now_ms() - window_ms)
        cutoff = cutoff_day if cutoff_day is not None else default
        if cutoff > today and not force:
            raise ValueError(f"cutoff day {cutoff} is after today ({today}, {config.timezone}): it would drop "
                             f"packs that have not expired; the default is {default} (today minus the return "
                             "window). Use --force to prune anyway")
        return _prune(store, cutoff, progress=progress, dry_run=dry_run)

    return _offline(config, job)


def serve(config: Config) -> int:
    """`tracecode serve`: run until SIGTERM/SIGINT, then drain and stop the embedded Redis."""
    # One pseudonym key for every worker (generated here, before any worker, when none is set).
    config = config.replace(workers=workers.resolve(config.workers),
                            pseudonym_key_file=resolve_key_file(config))
    if config.workers > 1 and not workers.in_worker():
        # N processes of this function on one SO_REUSEPORT port under a supervising parent
        # that owns the embedded Redis and /metrics (server/workers.py).
        return workers.supervise(config)
    setup_logging(config)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("signal %s: already draining", name)
            return
        log.info("signal %s: draining (grace %.1f s)", name, config.grace_s)
        stopping.set()

    # Installed first: a signal during startup must still stop the embedded Redis on the way out.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if codec.IMPLEMENTATION != "compiled":
        log.warning("codec: using the pure-Python fallback (%s)", codec.IMPLEMENTATION)
    host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    http = embedded = store = server = None
    try:
        if config.metrics_port:
            # Before Redis and gRPC: a taken metrics port fails the start, not the first scrape.
            http = metrics.MetricsHTTP(config.metrics_port, host)
        # Before Redis and gRPC: a security misconfiguration fails the start (ValueError).
        security = auth.from_config(config)
        for warning in security.warnings:
            log.warning(warning)
        if config.audit_archive_bound:
            log.info("audit streams: archived (tracecode archive); trimmed at the archive's watermark, unarchived "
                     "entries dropped only past %d per stream (docs/archive.md)", config.audit_archive_bound)
        else:  # the demo, a laptop: said once, so nobody mistakes the streams for the record
            log.warning("audit streams: no archive configured (audit_archive_bound = 0): each stream keeps about "
                        "%d entries (MAXLEN ~), older ones are lost; docs/archive.md", config.audit_max)
        url = auth.redis_url(config, config.redis_url) if config.redis_url else ""
        if not url:
            embedded = EmbeddedRedis(config.data_dir, appendfsync=config.redis_appendfsync,
                                     backoff_s=(config.redis_restart_s, max(config.redis_restart_s, 10.0)),
                                     on_restart=lambda _why: metrics.EMBEDDED_REDIS_RESTARTS.inc()).start()
            url = embedded.url
            log.info("no --redis-url: started embedded redis-server, data in %s", embedded.data_dir)
        store = make_store(config, url)
        for warning in store.config_warnings():
            log.warning(warning)
        try:
            server = Server(config, store, **security.server_kwargs()).start()
        except DataSetMismatch as exc:  # another data set's settings: refuse to start, saying which
            log.error("refusing to start: %s", exc)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        # What startup allocated lives as long as the process: out of the collector's sight, a full
        # collection pauses all handler threads ~2 ms instead of ~30 ms (docs/performance.md).
        gc.freeze()
        log.info("tracecode %s listening on %s:%s (codec %s, metrics %s)", __version__, host, server.port,
                 codec.IMPLEMENTATION, http.port if http else "off")
        if http:
            print(f"tracecode metrics on port {http.port}", flush=True)
        print(f"tracecode listening on port {server.port}", flush=True)
        while not stopping.wait(3600):
            pass
    finally:
        if server:
            server.stop()
            log.info("gRPC server stopped")
        if store:
            store.close()
        if embedded:
            embedded.stop()
            log.info("embedded redis-server stopped")
        if http:
            http.close()
    log.info("tracecode stopped")
    return 0


if __name__ == "__main__":
    # A worker process of `tracecode serve --workers N` (workers.py starts it so). Through the
    # package modules, not this __main__ copy: serve() asks workers.in_worker().
    if sys.argv[1:2] == ["--worker"]:
        from tracecode.server import app as _app
        sys.exit(workers.worker_main(_app.serve, sys.argv[2:]))
    sys.exit("usage: python -m tracecode.server.app --worker N (started by `tracecode serve --workers N`)")
