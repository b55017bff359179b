"""Assembles and runs the server: store -> verifier -> servicers on a gRPC server, plus health,
reflection, metrics, the embedded Redis when no URL is given, and graceful shutdown."""
from __future__ import annotations

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
from prometheus_client import start_http_server

from tracecode import codec
from tracecode.v1 import (admin_pb2, admin_pb2_grpc, bulk_pb2, bulk_pb2_grpc, verification_pb2,
                          verification_pb2_grpc)

from .bulk import BulkServicer
from .config import Config
from .embedded_redis import RedisProcess
from .errors import StoreUnavailable
from .issuance import IssuanceService
from .keys import KeySpace
from .servicer import AdminServicer, VerificationServicer
from .store import Store, StoreLimits
from .verifier import Verifier

log = logging.getLogger("tracecode.server")

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


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if config.log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def make_store(config: Config, url: str) -> Store:
    limits = StoreLimits(audit_max=config.audit_max, history_max=config.history_max,
                         settlement_ttl_s=config.settlement_ttl_days * 86400)
    return Store.from_url(url, timeout_s=config.redis_timeout_s, max_connections=config.threads * 2 + 4,
                          keys=KeySpace(config.key_prefix), limits=limits)


class HealthWatch(threading.Thread):
    """Keeps the gRPC health status in step with Redis reachability (NOT_SERVING when it is down)."""

    def __init__(self, store: Store, servicer: health.HealthServicer, interval: float = 0.5):
        super().__init__(name="tracecode-health", daemon=True)
        self.store, self.servicer, self.interval = store, servicer, interval
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
            if ok != last:
                (log.info if ok else log.error)("redis %s", "reachable: SERVING" if ok else "unreachable: NOT_SERVING")
                self.set(ok)
                last = ok
            self.stopping.wait(self.interval)


class Server:
    """One tracecode server process bound to `config.listen` over the given store."""

    def __init__(self, config: Config, store: Store, *, identity=None, authorize=None,
                 credentials: grpc.ServerCredentials | None = None):
        self.config = config
        self.store = store
        self.verifier = Verifier(store, config)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="tracecode-rpc"),
            options=[("grpc.so_reuseport", 1 if config.workers > 1 else 0),
                     ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        verification_pb2_grpc.add_VerificationServicer_to_server(
            VerificationServicer(self.verifier, identity), self.grpc)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(IssuanceService(store, self.verifier.profile), authorize), self.grpc)
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
        self.watch = HealthWatch(store, self.health)

    def start(self) -> "Server":
        self.grpc.start()
        self.watch.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish within the grace period."""
        self.watch.stopping.set()
        self.watch.set(False)
        self.grpc.stop(self.config.grace_s if grace is None else grace).wait()


def serve(config: Config) -> int:
    """`tracecode serve`: run until SIGTERM/SIGINT."""
    setup_logging(config)
    if codec.IMPLEMENTATION != "compiled":
        log.warning("codec: using the pure-Python fallback (%s)", codec.IMPLEMENTATION)
    embedded = None
    url = config.redis_url
    if not url:
        embedded = RedisProcess(config.data_dir, appendfsync=config.redis_appendfsync).start()
        url = embedded.url
        log.info("no --redis-url: started embedded redis-server, data in %s", embedded.data_dir)
    store = make_store(config, url)
    server = Server(config, store).start()
    if config.metrics_port:
        host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        start_http_server(config.metrics_port, addr=host)
    log.info("tracecode listening on %s (codec %s, metrics %s)", f"{config.listen.rsplit(':', 1)[0]}:{server.port}",
             codec.IMPLEMENTATION, config.metrics_port or "off")
    print(f"tracecode listening on port {server.port}", flush=True)

    done = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %s: draining (grace %.0f s)", signal.Signals(signum).name, config.grace_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(3600):
        pass
    server.stop()
    store.close()
    if embedded:
        embedded.stop()
        log.info("embedded redis-server stopped")
    log.info("tracecode stopped")
    return 0
