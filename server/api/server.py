"""The gRPC server of one process: store -> verifier -> servicers on a grpc.server, plus health
(kept in step with Redis), reflection, the interceptors (metrics, drain, log context, auth) and a
graceful stop. app.serve builds one per process.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tracecode import __version__
from tracecode.v1 import (admin_pb2, admin_pb2_grpc, audit_pb2, audit_pb2_grpc, bulk_pb2, bulk_pb2_grpc,
                          identity_pb2, identity_pb2_grpc, receiving_pb2, receiving_pb2_grpc, verification_pb2,
                          verification_pb2_grpc)

from .. import metrics
from ..config import Config
from ..errors import StoreUnavailable
from ..issuance import IssuanceService
from ..receiving import ReceivingService
from ..store import DataSetMarker, Store
from tracecode.rules import live
from tracecode.rules.pseudonym import Pseudonymizer
from ..sanction_service import SanctionService, resolve_key_file
from ..verifier import Verifier
from .audit import AuditFeedServicer
from .bulk import BulkServicer
from .identity import IdentityServicer
from .receiving import ReceivingServicer
from .interceptors import Chain, DrainInterceptor, LogContextInterceptor, MetricsInterceptor
from .servicer import AdminServicer, VerificationServicer

log = logging.getLogger("tracecode.server")

# After the drain: time gRPC's stop gives calls taken in the last instant (the drain answers them
# UNAVAILABLE at once) before it cancels what is left, i.e. open health Watch streams.
_FINAL_GRACE_S = 1.0

SERVICE_NAMES = (
    verification_pb2.DESCRIPTOR.services_by_name["Verification"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    bulk_pb2.DESCRIPTOR.services_by_name["BulkVerification"].full_name,
    # The audit feed (issue 24): drained, measured, health-reported and reflected like the others.
    audit_pb2.DESCRIPTOR.services_by_name["AuditFeed"].full_name,
    # WhoAmI (issue 28): the console's pharmacy API verifies a pharmacy's token through it.
    identity_pb2.DESCRIPTOR.services_by_name["Identity"].full_name,
    # The receiving check (issue 28): a pharmacy's deliveries, before they become stock.
    receiving_pb2.DESCRIPTOR.services_by_name["Receiving"].full_name,
)


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
        self.verifier = Verifier(store, config, live.load(config.models_config or None, config.live_rules))
        # Insured pseudonyms and sanctions (sanction_service.py): one key file per deployment.
        self.sanctions = SanctionService(
            store, Pseudonymizer.from_file(resolve_key_file(config)), tz=self.verifier.tz,
            view_max_age_s=config.sanction_view_max_age_s)
        self.verifier.sanctions = self.sanctions
        # The data set must be the one this configuration and key describe (store/marker.py): a
        # mismatch refuses to start (DataSetMismatch); Redis down defers the check to the first call.
        key = self.sanctions.pseudonymizer
        try:
            store.open_dataset(DataSetMarker(store.keys.code_buckets, key.key_id, key.fingerprint(),
                                             written_by=__version__), create=True)
        except StoreUnavailable as exc:
            log.warning("data-set marker not checked yet (%s): the first call to Redis checks it", exc)
        self.drain = DrainInterceptor(SERVICE_NAMES)
        # Log context outermost, so the metrics interceptor's per-call debug line carries the ids;
        # drain innermost, so the calls it turns away are counted (Unavailable).
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="tracecode-rpc"),
            # One Chain: gRPC's pipeline then runs one level per call, not one per interceptor.
            interceptors=[Chain([LogContextInterceptor(),
                                 MetricsInterceptor((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)),
                                 self.drain, *interceptors])],  # then authentication (auth.py), if any
            options=[("grpc.so_reuseport", 1 if config.workers > 1 else 0),
                     ("grpc.max_receive_message_length", config.max_message_bytes)],
            # Beyond this many calls in progress gRPC answers RESOURCE_EXHAUSTED instead of
            # queueing without bound behind the handler threads.
            maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        )
        verification = VerificationServicer(self.verifier, identity)
        verification_pb2_grpc.add_VerificationServicer_to_server(verification, self.grpc)
        receiving_pb2_grpc.add_ReceivingServicer_to_server(
            ReceivingServicer(ReceivingService(self.verifier), verification.site_of), self.grpc)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(_CountedIssuance(store, self.verifier.profile), authorize, self.sanctions), self.grpc)
        bulk_pb2_grpc.add_BulkVerificationServicer_to_server(
            BulkServicer(self.verifier, authorize=authorize), self.grpc)
        # The audit feed (server/api/audit.py): admin only, through the same authorize hook.
        self.audit = AuditFeedServicer(store, authorize)
        audit_pb2_grpc.add_AuditFeedServicer_to_server(self.audit, self.grpc)
        identity_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(), self.grpc)
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
        # Open audit feeds end now (their readers reconnect), rather than hold the drain for the
        # whole grace period.
        self.audit.stopping.set()
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


