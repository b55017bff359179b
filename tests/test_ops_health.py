"""gRPC health follows Redis (own redis-server, stopped and restarted), the drain reports
NOT_SERVING, logs name the settlement, and reflection lets a client call without the proto."""
from __future__ import annotations

import io
import json
import logging
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server import metrics
from tracecode.server.app import Server, make_store
from tracecode.server.logs import JsonFormatter
from tracecode.server.config import Config
from tracecode.server.store import RedisProcess, free_port
from tracecode.server.logs import LogContextFilter

from factories import cn20, issuance, load
from ops_support import Samples, scrape, wait_for

# Health and reflection over the server's own Redis or the shared one: one backend.
pytestmark = pytest.mark.backend_independent

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone: it gets stopped and restarted (same port, same dir; with
    its AOF, so it comes back with its data, as a restarted production Redis does)."""
    proc = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendonly=True).start()
    yield proc
    proc.stop()


@pytest.fixture
def own_server(own_redis):
    # Not the shared `config` fixture: that one follows the session's Redis backends.
    config = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix="health", threads=8, grace_s=1.0)
    store = make_store(config, own_redis.url)
    srv = Server(config, store).start()
    yield srv
    srv.stop(0)
    store.close()


@pytest.fixture(scope="module")
def metrics_port():
    http = metrics.MetricsHTTP(0)
    yield http.port
    http.close()


def check(stub, service: str = "") -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


class Watcher:
    """A health Watch stream read on a thread: the statuses in the order they arrived."""

    def __init__(self, channel: grpc.Channel, service: str = ""):
        self.statuses: list[int] = []
        self.call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=60)
        self.ended: grpc.StatusCode | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for resp in self.call:
                self.statuses.append(resp.status)
        except grpc.RpcError as exc:
            self.ended = exc.code()

    def distinct(self) -> list[int]:
        out = []
        for s in self.statuses:
            if not out or out[-1] != s:
                out.append(s)
        return out


def test_health_turns_not_serving_within_2s_of_redis_stopping_and_back_after_it_returns(
        own_redis, own_server, metrics_port):
    target = f"127.0.0.1:{own_server.port}"
    codes = [cn20(), cn20()]
    services = ("", "tracecode.v1.Verification", "tracecode.v1.Admin")
    admin = AdminClient(target)
    with grpc.insecure_channel(target) as channel, PosClient(target, retries=0, deadline_s=5) as pos:
        stub = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: all(check(stub, s) == SERVING for s in services), 5, "SERVING at start")
        load(admin, *(issuance(c, "8123456") for c in codes))
        watcher = Watcher(channel)
        wait_for(lambda: watcher.statuses, 5, "the first Watch answer")
        before = Samples(scrape(metrics_port))
        assert before.value("tracecode_redis_up") == 1

        stopped_at = time.monotonic()
        own_redis.stop()
        wait_for(lambda: check(stub) == NOT_SERVING, 2.0, "NOT_SERVING within 2 s of Redis stopping")
        took = time.monotonic() - stopped_at
        assert took < 2.0
        assert all(check(stub, s) == NOT_SERVING for s in services)

        # Meanwhile a settlement is answered UNAVAILABLE (retry later with the same id), and the
        # log line about it names the site and the settlement.
        log_lines = io.StringIO()
        handler = logging.StreamHandler(log_lines)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(LogContextFilter())
        logging.getLogger("tracecode").addHandler(handler)
        try:
            with pytest.raises(grpc.RpcError) as err:
                pos.verify("SITE-H", [line(codes[0], "8123456")], settlement_id="health-1")
        finally:
            logging.getLogger("tracecode").removeHandler(handler)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        docs = [json.loads(x) for x in log_lines.getvalue().splitlines()]
        about = [d for d in docs if d.get("settlement_id") == "health-1"]
        assert about and all(d["site_id"] == "SITE-H" for d in about), docs
        assert any("redis unavailable" in d["msg"] for d in about)

        down = Samples(scrape(metrics_port))
        assert down.value("tracecode_redis_up") == 0
        assert down.value("tracecode_redis_errors_total", op="verify") == before.value(
            "tracecode_redis_errors_total", op="verify") + 1
        assert down.value("tracecode_redis_errors_total", op="ping") > before.value(
            "tracecode_redis_errors_total", op="ping")
        assert down.value("grpc_server_handled_total", grpc_method="VerifyDispense", grpc_code="Unavailable") == \
            before.value("grpc_server_handled_total", grpc_method="VerifyDispense", grpc_code="Unavailable") + 1

        own_redis.start()
        wait_for(lambda: check(stub) == SERVING, 3.0, "SERVING again after Redis returns")
        assert all(check(stub, s) == SERVING for s in services)
        # The retry with the same settlement id now goes through.
        resp = pos.verify("SITE-H", [line(codes[0], "8123456")], settlement_id="health-1")
        assert resp.recorded
        wait_for(lambda: watcher.distinct()[-3:] == [SERVING, NOT_SERVING, SERVING], 3,
                 "the Watch stream to see SERVING, NOT_SERVING, SERVING")
        assert Samples(scrape(metrics_port)).value("tracecode_redis_up") == 1
        watcher.call.cancel()
    admin.close()


def test_drain_reports_not_serving_to_watchers_before_the_server_goes(own_server):
    target = f"127.0.0.1:{own_server.port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: check(stub) == SERVING, 5, "SERVING at start")
        watcher = Watcher(channel)
        wait_for(lambda: watcher.statuses == [SERVING], 5, "the first Watch answer")
        stopper = threading.Thread(target=own_server.stop, args=(1.0,))
        stopper.start()
        wait_for(lambda: NOT_SERVING in watcher.statuses, 1.0, "NOT_SERVING on drain")
        stopper.join(10)
        watcher.thread.join(10)
        # The open Watch held the server for the grace period, then was cancelled.
        assert watcher.ended is not None and not stopper.is_alive()


def test_reflection_lets_a_generic_client_call_without_the_proto(server, admin, target):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"tracecode.v1.Verification", "tracecode.v1.Admin", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        # A pool of its own, filled only from what the server describes about itself.
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("tracecode.v1.Verification").methods_by_name["CheckCodes"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict({"siteId": "SITE-R", "lines": [{"rawCode": code, "productId": "8123456"}]},
                                        request_cls())
        call = channel.unary_unary(f"/tracecode.v1.Verification/{method.name}",
                                   request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        resp = json_format.MessageToDict(call(request, timeout=5))
    assert resp["results"][0]["verdict"] == "OK"
    assert resp["results"][0]["canonicalCode"] == code
