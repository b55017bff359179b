"""Assembles and runs the server: store -> verifier -> servicers on a gRPC server, plus health,
reflection, metrics, the embedded Redis when no URL is given, and graceful shutdown."""
from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tracecode import __version__, codec
from tracecode.v1 import (admin_pb2, admin_pb2_grpc, bulk_pb2, bulk_pb2_grpc, verification_pb2,
                          verification_pb2_grpc)

from . import auth, workers
from .bulk import BulkServicer
from . import metrics
from .config import Config
from .embedded_redis import EmbeddedRedis
from .errors import StoreUnavailable
from .interceptors import DrainInterceptor, LogContextFilter, LogContextInterceptor, MetricsInterceptor
from .issuance import IssuanceService
from .keys import KeySpace
from .pseudonym import Pseudonymizer
from .sanction_service import SanctionService, resolve_key_file
from .servicer import AdminServicer, VerificationServicer
from .store import Store, StoreLimits
from .verifier import Verifier

log = logging.getLogger("tracecode.server")

# After the drain: time gRPC's stop gives calls taken in the last instant (the drain answers them
# UNAVAILABLE at once) before it cancels what is left, i.e. open health Watch streams.
_FINAL_GRACE_S = 1.0

SERVICE_NAMES = (
    verification_pb2.DESCRIPTOR.services_by_name["Verification"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    bulk_pb2.DESCRIPTOR.services_by_name["BulkVerification"].full_name,
)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        for k in ("site_id", "settlement_id"):
            if hasattr(record, k):
                doc[k] = getattr(record, k)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if hasattr(record, "site_id"):
            # repr: the ids are not validated yet when a line about them is logged
            line += f" site_id={record.site_id!r} settlement_id={getattr(record, 'settlement_id', '')!r}"
        return line


def setup_logging(config: Config) -> None:
    """One handler on the root logger, JSON or text, carrying the site and settlement id of the
    request being handled (LogContextFilter) on every line logged while handling it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if config.log_json else _TextFormatter())
    handler.addFilter(LogContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


class MalformedMessageLog(logging.Filter):
    """On grpc's own logger: a request that does not decode as its message type makes grpc log
    an ERROR with a traceback, once per message, which lets any client flood the log. Each one is
    counted (tracecode_malformed_messages_total) and at most one line a second is let through,
    as a WARNING without traceback saying how many were held back."""

    MESSAGE = "Exception deserializing"
    INTERVAL_S = 1.0

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        metrics.MALFORMED_MESSAGES.inc()
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.INTERVAL_S:
                self._held += 1
                return False
            held, self._held, self._last = self._held, 0, now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = ("a request message could not be decoded as its protobuf type "
                                   "(answered INTERNAL); %d more since the last such line"), (held,)
        record.exc_info = record.exc_text = None
        return True


def install_malformed_message_log() -> None:
    """Idempotent: one filter on grpc's logger per process."""
    grpc_log = logging.getLogger("grpc._common")
    if not any(isinstance(f, MalformedMessageLog) for f in grpc_log.filters):
        grpc_log.addFilter(MalformedMessageLog())


def make_store(config: Config, url: str) -> Store:
    limits = StoreLimits(audit_max=config.audit_max, history_max=config.history_max,
                         settlement_ttl_s=config.settlement_ttl_days * 86400,
                         reservation_ms=int(config.reservation_s * 1000),
                         min_replicas_acked=config.min_replicas_acked,
                         replica_ack_timeout_ms=config.replica_ack_timeout_ms)
    # A WAIT for replicas must end (and answer UNAVAILABLE) before the socket gives up on it.
    timeout_s = max(config.redis_timeout_s,
                    config.replica_ack_timeout_ms / 1000 + 0.5 if config.min_replicas_acked else 0)
    store = Store.from_url(url, timeout_s=timeout_s, max_connections=config.threads * 2 + 4,
                           keys=KeySpace(config.key_prefix), limits=limits, cluster=config.redis_cluster)
    return metrics.instrument_store(store)


class _CountedIssuance(IssuanceService):
    """Counts what each upload loaded (tracecode_issuance_records_total)."""

    def upsert_stream(self, requests):
        resp = super().upsert_stream(requests)
        metrics.issuance_loaded(resp)
        return resp


class HealthWatch(threading.Thread):
    """Keeps the gRPC health status in step with Redis reachability (NOT_SERVING when it is down),
    for the whole server ("") and each service by name, and exports it as tracecode_redis_up.

    A ping to a stopped Redis fails at once (connection refused), so the status turns within one
    interval; a Redis that hangs instead takes up to the Redis socket timeout more."""

    def __init__(self, store: Store, servicer: health.HealthServicer, interval: float = 0.5,
                 fresh=lambda: True):
        super().__init__(name="tracecode-health", daemon=True)
        self.store, self.servicer, self.interval = store, servicer, interval
        # Whatever else must hold to serve (the sanction view's freshness on a cluster).
        self.fresh = fresh
        self.stopping = threading.Event()

    def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            self.servicer.set(name, status)

    def run(self) -> None:
        last = None
        while not self.stopping.is_set():
            try:
                ok = self.store.ping()
            except StoreUnavailable:
                ok = False
            except Exception:  # noqa: BLE001 - e.g. an ACL that denies PING: down, and say why
                # This thread must outlive any error: if it died, the status would stay as it
                # was (SERVING) whatever happened to Redis afterwards.
                if last is not False:
                    log.exception("redis health ping failed")
                ok = False
            metrics.REDIS_UP.set(1 if ok else 0)
            if ok and not self.fresh():
                if last is not False:
                    log.error("sanction view older than its bound: NOT_SERVING")
                ok = False
            if ok != last:
                (log.info if ok else log.error)("redis %s", "reachable: SERVING" if ok else "unreachable: NOT_SERVING")
                self.set(ok)
                last = ok
            self.stopping.wait(self.interval)


class Server:
    """One tracecode server process bound to `config.listen` over the given store."""

    def __init__(self, config: Config, store: Store, *, identity=None, authorize=None,
                 credentials: grpc.ServerCredentials | None = None, interceptors=()):
        self.config = config
        self.store = store
        install_malformed_message_log()
        self.verifier = Verifier(store, config)
        # Insured pseudonyms and sanctions (sanction_service.py): one key file per deployment.
        self.sanctions = SanctionService(
            store, Pseudonymizer.from_file(resolve_key_file(config)), tz=self.verifier.tz,
            view_max_age_s=config.sanction_view_max_age_s)
        self.verifier.sanctions = self.sanctions
        self.drain = DrainInterceptor(SERVICE_NAMES)
        # Log context outermost, so the metrics interceptor's per-call debug line carries the ids;
        # drain innermost, so the calls it turns away are counted (Unavailable).
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="tracecode-rpc"),
            interceptors=[LogContextInterceptor(),
                          MetricsInterceptor((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)),
                          self.drain, *interceptors],  # then authentication (auth.py), if any
            options=[("grpc.so_reuseport", 1 if config.workers > 1 else 0),
                     ("grpc.max_receive_message_length", config.max_message_bytes)],
            # Beyond this many calls in progress gRPC answers RESOURCE_EXHAUSTED instead of
            # queueing without bound behind the handler threads.
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        )
        verification_pb2_grpc.add_VerificationServicer_to_server(
            VerificationServicer(self.verifier, identity), self.grpc)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(_CountedIssuance(store, self.verifier.profile), authorize, self.sanctions), self.grpc)
        bulk_pb2_grpc.add_BulkVerificationServicer_to_server(
            BulkServicer(self.verifier, authorize=authorize), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        if credentials is None:
            self.port = self.grpc.add_insecure_port(config.listen)
        else:
            self.port = self.grpc.add_secure_port(config.listen, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        self.watch = HealthWatch(store, self.health, fresh=self._sanctions_fresh)
        # NOT_SERVING until the first ping of Redis succeeds (the servicer starts out SERVING).
        self.watch.set(False)

    def _sanctions_fresh(self) -> bool:
        view = self.sanctions.view
        metrics.SANCTION_VIEW_AGE.set(min(view.age_s(), 1e9))
        metrics.SANCTION_VIEW_ENTRIES.set(len(view))
        # On one node the settlement's own call judges sanctions: the view only serves bulk jobs.
        return view.fresh() or not self.store.cluster

    def start(self) -> "Server":
        self.sanctions.start()
        self.grpc.start()
        self.watch.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: report NOT_SERVING, answer new calls UNAVAILABLE, let the calls in
        progress finish within the grace period (config.grace_s by default), then stop gRPC,
        cancelling what is left (see DrainInterceptor for why gRPC's stop alone is not enough)."""
        grace = self.config.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        self.watch.stopping.set()
        self.watch.set(False)
        # From here on the watch thread, if mid-ping, cannot flip the status back to SERVING.
        self.health.enter_graceful_shutdown()
        self.drain.begin()
        if not self.drain.settle(deadline) and grace > 0:
            log.warning("grace period of %.1f s over with %d call(s) running or calls still arriving: "
                        "stopping anyway", grace, self.drain.active)
        # What remains is ours to refuse quickly (calls taken just now) and long-lived health
        # Watch streams, which need not hold the process for the rest of the grace period.
        self.grpc.stop(min(max(deadline - time.monotonic(), 0.0), _FINAL_GRACE_S)).wait()
        if self.watch.is_alive():
            # Ends within one ping (bounded by the Redis timeout), so a closed store is not pinged.
            self.watch.join(self.config.redis_timeout_s + 1)
        self.sanctions.stop()


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
        url = auth.redis_url(config, config.redis_url) if config.redis_url else ""
        if not url:
            embedded = EmbeddedRedis(config.data_dir, appendfsync=config.redis_appendfsync,
                                     backoff_s=(config.redis_restart_s, max(config.redis_restart_s, 10.0)),
                                     on_restart=lambda _why: metrics.EMBEDDED_REDIS_RESTARTS.inc()).start()
            url = embedded.url
            log.info("no --redis-url: started embedded redis-server, data in %s", embedded.data_dir)
        store = make_store(config, url)
        server = Server(config, store, **security.server_kwargs()).start()
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
