"""Metrics over a real /metrics endpoint: the gRPC server metrics of every call type and status,
settlement and verdict counters, Redis call latency, issuance and bulk progress, build info, no
unbounded label, and `promtool check metrics` on the live output."""
from __future__ import annotations

import subprocess
import threading
import time
from datetime import datetime, timezone

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tracecode
from tracecode import codec
from tracecode.clients.pos import line
from tracecode.server import metrics
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, issuance, load
from ops_support import Samples, scrape, tool, wait_for

# The metrics' names, labels and format do not depend on the backend: run on one
# (the Redis round-trip count per settlement does, and runs on both).
pytestmark = pytest.mark.backend_independent

V = {"grpc_service": "tracecode.v1.Verification", "grpc_type": "unary"}


@pytest.fixture(scope="module")
def metrics_port():
    http = metrics.MetricsHTTP(0)
    yield http.port
    http.close()


@pytest.fixture
def scraped(metrics_port):
    return lambda: Samples(scrape(metrics_port))


def delta(before: Samples, after: Samples, name: str, **labels) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def test_live_metrics_pass_promtool_check_metrics(pos, admin, metrics_port):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    pos.verify("SITE-A", [line(code, "8123456")])
    text = scrape(metrics_port)
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr
    families = Samples(text).families
    for name in ("tracecode_build_info", "tracecode_verifications", "tracecode_settlements",
                 "tracecode_verify_duration_seconds", "tracecode_redis_call_duration_seconds",
                 "tracecode_redis_errors", "tracecode_redis_up", "tracecode_issuance_records",
                 "tracecode_bulk_jobs_running", "tracecode_bulk_records", "tracecode_bulk_flagged",
                 "grpc_server_started", "grpc_server_handled", "grpc_server_handling_seconds",
                 "grpc_server_msg_received", "grpc_server_msg_sent"):
        assert name in families, name


def test_build_info_names_version_and_codec(scraped):
    s = scraped()
    assert s.get("tracecode_build_info", version=tracecode.__version__, codec=codec.IMPLEMENTATION) == 1
    assert len([x for x in s.samples if x.name == "tracecode_build_info"]) == 1


@pytest.mark.all_backends
def test_settlements_count_verdicts_outcomes_latency_redis_calls_and_grpc(pos, admin, scraped):
    a, b = cn20(), cn20()
    load(admin, issuance(a, "8123456"), issuance(b, "8123456"))
    lines = [line(a, "8123456"), line(b, "8123456")]
    when = datetime.now(timezone.utc)
    before = scraped()
    pos.verify("SITE-A", lines, settlement_id="m-2", settled_at=when)          # 2 OK, recorded
    pos.verify("SITE-A", lines, settlement_id="m-2", settled_at=when)          # replayed
    pos.verify("SITE-B", lines, settlement_id="m-3", settled_at=when)          # 2 DUPLICATE
    after = scraped()
    d = lambda name, **kw: delta(before, after, name, **kw)  # noqa: E731
    assert d("tracecode_verifications_total", verdict="OK", channel="pos") == 2
    assert d("tracecode_verifications_total", verdict="DUPLICATE", channel="pos") == 2
    assert d("tracecode_verifications_total", verdict="OK", channel="bulk") == 0
    assert d("tracecode_settlements_total", outcome="recorded", channel="pos") == 1
    assert d("tracecode_settlements_total", outcome="replayed", channel="pos") == 1
    assert d("tracecode_settlements_total", outcome="not_recorded", channel="pos") == 1
    assert d("tracecode_verify_duration_seconds_count", channel="pos") == 3
    assert d("tracecode_verify_duration_seconds_sum", channel="pos") > 0
    # One Redis round trip per settlement, replay included; each measured.
    assert d("tracecode_redis_call_duration_seconds_count", op="verify") == 3
    assert d("tracecode_redis_errors_total", op="verify") == 0
    m = {"grpc_method": "VerifyDispense", **V}
    assert d("grpc_server_started_total", **m) == 3
    assert d("grpc_server_handled_total", grpc_code="OK", **m) == 3
    assert d("grpc_server_msg_received_total", **m) == 3
    assert d("grpc_server_msg_sent_total", **m) == 3
    assert d("grpc_server_handling_seconds_count", **m) == 3
    # Every status code of a method exists from the start, so increase() sees its first event.
    assert after.get("grpc_server_handled_total", grpc_code="DataLoss", **m) == 0


def test_error_statuses_are_labelled_with_their_grpc_code(pos, admin, scraped):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    m = {"grpc_method": "VerifyDispense", **V}
    before = scraped()
    with pytest.raises(grpc.RpcError) as bad:
        pos.verify("no spaces allowed", [line(code, "8123456")])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    pos.verify("SITE-A", [line(code, "8123456")], settlement_id="conflict-1")
    with pytest.raises(grpc.RpcError) as conflict:
        pos.verify("SITE-A", [line(code, "8123457")], settlement_id="conflict-1")
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as missing:
        pos.reverse("SITE-A", "never-settled")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    after = scraped()
    d = lambda name, **kw: delta(before, after, name, **kw)  # noqa: E731
    assert d("grpc_server_handled_total", grpc_code="InvalidArgument", **m) == 1
    assert d("grpc_server_handled_total", grpc_code="AlreadyExists", **m) == 1
    assert d("grpc_server_handled_total", grpc_code="OK", **m) == 1
    assert d("grpc_server_started_total", **m) == 3
    assert d("grpc_server_msg_sent_total", **m) == 1  # an error status carries no message
    assert d("grpc_server_handled_total", grpc_code="NotFound", grpc_method="ReverseDispense", **V) == 1


def test_unknown_methods_are_not_labelled(target, scraped):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/tracecode.v1.Verification/NoSuchMethodXyz",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "NoSuchMethodXyz" not in scraped().text


def test_client_stream_counts_messages_and_issuance_outcomes(admin, scraped):
    rows = [issuance(cn20(), "8123456") for _ in range(5)]
    m = {"grpc_service": "tracecode.v1.Admin", "grpc_method": "UpsertIssuance", "grpc_type": "client_stream"}
    before = scraped()
    admin.upsert(rows, chunk=2, source="t")           # 3 messages: 2 + 2 + 1 records, all created
    admin.upsert(rows[:2], chunk=2, source="t")       # unchanged
    resp = admin.upsert([issuance("not-a-code", "8123456")], source="t")
    assert resp.rejected == 1
    after = scraped()
    d = lambda name, **kw: delta(before, after, name, **kw)  # noqa: E731
    assert d("grpc_server_msg_received_total", **m) == 5
    assert d("grpc_server_handled_total", grpc_code="OK", **m) == 3
    assert d("grpc_server_msg_sent_total", **m) == 3
    assert d("tracecode_issuance_records_total", outcome="created") == 5
    assert d("tracecode_issuance_records_total", outcome="unchanged") == 2
    assert d("tracecode_issuance_records_total", outcome="rejected") == 1


def test_server_stream_cancelled_by_the_client_is_counted_canceled(target, server, scraped):
    m = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch", "grpc_type": "server_stream"}
    before = scraped()
    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        # Redis is up: the watch reaches SERVING (a NOT_SERVING may come first, right after start).
        status = next(stream).status
        while status != health_pb2.HealthCheckResponse.SERVING:
            status = next(stream).status
        stream.cancel()
    # The server learns of the cancellation asynchronously.
    def counted():
        s = scraped()
        return s if delta(before, s, "grpc_server_handled_total", grpc_code="Canceled", **m) == 1 else None
    after = wait_for(counted, 5, "the cancelled Watch to be counted")
    assert delta(before, after, "grpc_server_started_total", **m) == 1
    assert delta(before, after, "grpc_server_msg_sent_total", **m) >= 1
    assert delta(before, after, "grpc_server_handled_total", grpc_code="OK", **m) == 0


def test_labels_are_bounded(pos, admin, scraped):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    pos.verify("SITE-UNBOUNDED-7731", [line(code, "8123456")], settlement_id="settle-unbounded-7731")
    pos.verify("SITE-OTHER-7731", [line(code, "8123456")])
    s = scraped()
    for needle in ("SITE-UNBOUNDED-7731", "settle-unbounded-7731", code, "SITE-OTHER-7731"):
        assert needle not in s.text
    allowed = {"verdict", "channel", "outcome", "op", "kind", "version", "codec", "le",
               "grpc_type", "grpc_service", "grpc_method", "grpc_code",
               "reason",  # tracecode_sanction_refusals_total: SITE_SANCTIONED | INSURED_SANCTIONED
               "model",  # tracecode_live_rule_results_total: STOCKPILING | RESALE_SOURCE
               "notice"}  # tracecode_receipt_notices_total: RECEIVED_ELSEWHERE | NOT_RECEIVED
    ours = [x for x in s.samples if x.name.startswith(("tracecode_", "grpc_server_"))]
    assert ours and {k for x in ours for k in x.labels} <= allowed


def test_bulk_job_api_reports_running_progress_and_outcome(scraped):
    before = scraped()
    with metrics.bulk_job("replay") as job:
        job.progress(10, 2)
        job.progress(5)
        during = scraped()
    after = scraped()
    assert during.value("tracecode_bulk_jobs_running", kind="replay") == before.value("tracecode_bulk_jobs_running", kind="replay") + 1
    assert after.value("tracecode_bulk_jobs_running", kind="replay") == before.value("tracecode_bulk_jobs_running", kind="replay")
    assert delta(before, after, "tracecode_bulk_records_total", kind="replay") == 15
    assert delta(before, after, "tracecode_bulk_flagged_total", kind="replay") == 2
    assert abs(during.value("tracecode_bulk_last_progress_timestamp_seconds", kind="replay") - time.time()) < 60
    assert delta(before, after, "tracecode_bulk_jobs_total", kind="replay", outcome="finished") == 1

    with pytest.raises(RuntimeError):
        with metrics.bulk_job("check"):
            raise RuntimeError("boom")

    def stream():
        with metrics.bulk_job("check") as j:
            for i in range(10):
                j.progress(1)
                yield i
    gen = stream()
    next(gen)
    gen.close()  # what gRPC does to a response generator whose client went away

    metrics.bulk_progress(3, 1, kind="job-4711")  # a job id is no kind: folded into "other"
    end = scraped()
    assert delta(after, end, "tracecode_bulk_jobs_total", kind="check", outcome="failed") == 1
    assert delta(after, end, "tracecode_bulk_jobs_total", kind="check", outcome="abandoned") == 1
    assert end.value("tracecode_bulk_jobs_running", kind="check") == after.value("tracecode_bulk_jobs_running", kind="check")
    assert delta(after, end, "tracecode_bulk_records_total", kind="other") == 3
    assert "job-4711" not in end.text


def test_concurrent_calls_are_all_counted(target, admin, scraped):
    codes = [cn20() for _ in range(40)]
    load(admin, *(issuance(c, "8123456") for c in codes))
    m = {"grpc_method": "CheckCodes", **V}
    before = scraped()
    errors = []

    def worker(chunk):
        from tracecode.clients.pos import PosClient
        try:
            with PosClient(target, deadline_s=10) as pos:
                for c in chunk:
                    assert pos.check([line(c, "8123456")]).results[0].verdict == pb.OK
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(codes[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    after = scraped()
    assert delta(before, after, "grpc_server_handled_total", grpc_code="OK", **m) == 40
    assert delta(before, after, "grpc_server_handling_seconds_count", **m) == 40
