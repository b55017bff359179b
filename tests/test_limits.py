"""Input limits, each with its specific error, over real gRPC and Redis: lines per settlement, raw
code length, field sizes and times (INVALID_ARGUMENT with google.rpc.BadRequest naming the field
and line), message size and concurrent calls (RESOURCE_EXHAUSTED from gRPC itself), and the
per-client rate limit (RESOURCE_EXHAUSTED with RetryInfo for calls; slowed, not refused, streams)."""
from __future__ import annotations

import queue
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.api import auth
from tracecode.server.app import Server
from tracecode.v1 import bulk_pb2, bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc

from factories import cn20, issuance, load
from helpers import verdicts

# Limits are enforced before the store is called: run on one backend.
pytestmark = pytest.mark.backend_independent

P = "8123456"


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def violations(err: grpc.RpcError) -> dict[str, str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status.from_call(err)
    detail = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(detail)
    return {v.field: v.description for v in detail.field_violations}


def unmarked(pos, *codes) -> bool:
    return all(pos.history(c).units_used == 0 for c in codes)


# --------------------------------------------------------------------------- request contents

def test_too_many_lines_is_invalid_argument_naming_lines(make_server, admin):
    target = make_server(max_lines=5)
    codes = [cn20() for _ in range(6)]
    load(admin, *(issuance(c, P) for c in codes))
    with PosClient(target, deadline_s=5, retries=0) as pos:
        err = refusal(lambda: pos.verify("LIM-A", [line(c, P) for c in codes]))
        assert violations(err) == {"lines": "6 lines, at most 5 per settlement"}
        assert unmarked(pos, *codes)
        err = refusal(lambda: pos.check([line(c, P) for c in codes]))
        assert "lines" in violations(err)
        assert verdicts(pos.verify("LIM-A", [line(c, P) for c in codes[:5]])) == ["OK"] * 5


def test_empty_settlement_is_invalid_argument(pos):
    assert violations(refusal(lambda: pos.verify("LIM-A", []))) == {"lines": "at least one line is required"}


def test_too_long_raw_code_names_its_line_and_marks_nothing(make_server, admin):
    target = make_server(max_code_length=40)
    good = cn20()
    load(admin, issuance(good, P))
    long_scan = "(01)" + "0" * 37  # 41 characters
    with PosClient(target, deadline_s=5, retries=0) as pos:
        err = refusal(lambda: pos.verify("LIM-A", [line(good, P), line(good, P, 1), line(long_scan, P)]))
        assert violations(err) == {"lines[2].raw_code": "41 characters, at most 40"}
        assert unmarked(pos, good)
        err = refusal(lambda: pos.history(long_scan))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "40" in err.details()


def test_every_bad_field_is_named_at_once_with_its_line(pos):
    ok = line(cn20(), P)
    err = refusal(lambda: pos.verify("site with spaces", [
        ok, line(cn20(), ""), line(cn20(), "p" * 65), line(cn20(), P, 100_001), line("8" * 600, P)],
        settlement_id="x" * 65))
    got = violations(err)
    assert set(got) == {"site_id", "settlement_id", "lines[1].product_id", "lines[2].product_id",
                        "lines[3].units", "lines[4].raw_code"}, got
    assert got["lines[3].units"] == "100001 outside 0..100000"
    assert got["lines[4].raw_code"] == "600 characters, at most 512"


def test_settlement_time_is_required_bounded_and_in_range(target):
    stub = verification_pb2_grpc.VerificationStub(grpc.insecure_channel(target))
    base = dict(settlement_id="t-1", site_id="LIM-A", lines=[pb.DispenseLine(raw_code=cn20(), product_id=P)])
    err = refusal(lambda: stub.VerifyDispense(pb.VerifyDispenseRequest(**base), timeout=5))
    assert violations(err) == {"settled_at": "required: the time of the sale"}
    far = timestamp_pb2.Timestamp()
    far.FromDatetime(datetime.now(timezone.utc) - timedelta(hours=1))
    err = refusal(lambda: stub.VerifyDispense(pb.VerifyDispenseRequest(settled_at=far, **base), timeout=5))
    assert "settled_at" in violations(err)
    # CheckCodes' `at` may be any instant, but one the calendar can hold: not year 10000.
    for seconds in (253402300800, -62135596801, 2**62):
        err = refusal(lambda s=seconds: stub.CheckCodes(pb.CheckCodesRequest(
            at=timestamp_pb2.Timestamp(seconds=s), lines=base["lines"]), timeout=5))
        assert violations(err) == {"at": "outside 1970-01-01 .. 2100-01-01 UTC"}


def test_bulk_settlement_with_an_impossible_time_is_its_own_error(target):
    stub = bulk_pb2_grpc.BulkVerificationStub(grpc.insecure_channel(target))
    chunk = bulk_pb2.SettlementChunk(chunk_seq=1, settlements=[
        bulk_pb2.BulkSettlement(site_id="LIM-A", settlement_id=f"b-{i}", settled_at=timestamp_pb2.Timestamp(seconds=s),
                                lines=[pb.DispenseLine(raw_code=cn20(), product_id=P)])
        for i, s in enumerate((2**62, int(time.time())))])
    out = list(stub.Reverify(iter([
        bulk_pb2.ReverifyRequest(options=bulk_pb2.JobOptions(job_id="lim", mode=bulk_pb2.CHECK)),
        bulk_pb2.ReverifyRequest(chunk=chunk), bulk_pb2.ReverifyRequest(finish=bulk_pb2.Finish())]), timeout=10))
    results = out[0].results
    assert "settled_at: outside 1970-01-01 .. 2100-01-01 UTC" in results[0].error
    assert not results[1].error and results[1].results[0].verdict == pb.UNKNOWN


# --------------------------------------------------------------------------- transport limits

def test_oversized_message_is_resource_exhausted(make_server, admin):
    target = make_server(max_message_bytes=64 * 1024)
    code = cn20()
    load(admin, issuance(code, P))
    with PosClient(target, deadline_s=5, retries=0) as pos:
        big = [line("8" * 500, "p" * 64) for _ in range(150)]  # ~85 KB
        err = refusal(lambda: pos.verify("LIM-A", big))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Below the limit the same kind of request is judged (each line MALFORMED).
        assert set(verdicts(pos.verify("LIM-A", big[:60]))) == {"MALFORMED"}
        assert verdicts(pos.verify("LIM-A", [line(code, P)])) == ["OK"]
    uploader = AdminClient(target)
    try:
        rows = [issuance(cn20(), P, manufacturer="m" * 200) for _ in range(400)]
        err = refusal(lambda: uploader.upsert(rows, source="t", chunk=400))  # one ~100 KB message
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert uploader.upsert(rows, source="t", chunk=100).created == 400  # smaller messages pass
    finally:
        uploader.close()


def test_calls_beyond_max_concurrent_rpcs_are_resource_exhausted(make_server):
    target = make_server(max_concurrent_rpcs=2, threads=4)
    channel = grpc.insecure_channel(target)
    bulk = bulk_pb2_grpc.BulkVerificationStub(channel)
    gates = [queue.Queue(), queue.Queue()]

    def held(gate):
        # A bulk job that stays open until its gate says Finish: one call in progress.
        yield bulk_pb2.ReverifyRequest(options=bulk_pb2.JobOptions(job_id="c", mode=bulk_pb2.CHECK))
        yield bulk_pb2.ReverifyRequest(chunk=bulk_pb2.SettlementChunk(chunk_seq=1))
        gate.get(timeout=20)
        yield bulk_pb2.ReverifyRequest(finish=bulk_pb2.Finish())

    streams = []
    try:
        for g in gates:
            streams.append(bulk.Reverify(held(g), timeout=30))
            assert next(streams[-1]).chunk_seq == 1  # answered: the call is in progress on the server
        pos = PosClient(channel, deadline_s=5, retries=0)
        err = refusal(lambda: pos.check([line(cn20(), P)]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    finally:
        for g in gates:
            g.put(None)
        for s in streams:
            list(s)
    # The slots free up as the server finishes the streams (a moment after the client saw them
    # end): a retrying client gets through.
    patient = PosClient(channel, deadline_s=5, retries=5, backoff_s=0.05)
    assert verdicts(patient.check([line(cn20(), P)])) == ["UNKNOWN"]
    channel.close()


# --------------------------------------------------------------------------- rate limits

@pytest.fixture
def limited(config, store, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"k" * 40)
    cfg = config.replace(auth="token", auth_token_secret_file=str(secret), rate_limit_rps=2, rate_limit_burst=3)
    srv = Server(cfg, store, **auth.from_config(cfg).server_kwargs()).start()
    yield f"127.0.0.1:{srv.port}", (lambda role, name: (("authorization", "Bearer " + auth.issue_token(
        b"k" * 40, role, name, 300)),))
    srv.stop(0)


def test_rate_limit_per_client_identity(limited):
    target, token = limited
    a = PosClient(target, deadline_s=5, retries=0, metadata=token("site", "RATE-A"))
    b = PosClient(target, deadline_s=5, retries=0, metadata=token("site", "RATE-B"))
    for _ in range(3):  # the burst
        a.check([line(cn20(), P)])
    err = refusal(lambda: a.check([line(cn20(), P)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "site:RATE-A" in err.details()
    retry = error_details_pb2.RetryInfo()
    assert rpc_status.from_call(err).details[0].Unpack(retry)
    delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    assert 0 < delay <= 0.5  # one token at 2/s
    assert verdicts(b.check([line(cn20(), P)])) == ["UNKNOWN"]  # another pharmacy has its own bucket
    time.sleep(delay + 0.05)
    assert verdicts(a.check([line(cn20(), P)])) == ["UNKNOWN"]
    # The POS client treats RESOURCE_EXHAUSTED as retryable: with retries it gets through.
    patient = PosClient(target, deadline_s=5, retries=4, backoff_s=0.2, metadata=token("site", "RATE-A"))
    for _ in range(3):
        assert verdicts(patient.check([line(cn20(), P)])) == ["UNKNOWN"]
    for c in (a, b, patient):
        c.close()


def test_rate_limit_slows_a_stream_instead_of_refusing_it(limited):
    target, token = limited
    uploader = AdminClient(target, metadata=token("admin", "ops1"))
    try:
        rows = [issuance(cn20(), P) for _ in range(9)]
        started = time.monotonic()
        resp = uploader.upsert(rows, source="t", chunk=1)  # 9 messages: 3 of burst, 6 at 2/s
        took = time.monotonic() - started
        assert resp.created == 9
        assert 2.0 <= took < 6.0, took
    finally:
        uploader.close()


def test_token_bucket_arithmetic():
    now = [0.0]
    limiter = auth.RateLimiter(rate=10, burst=2, clock=lambda: now[0])
    assert limiter.try_take("a") == 0 and limiter.try_take("a") == 0
    assert limiter.try_take("a") == pytest.approx(0.1)
    assert limiter.try_take("b") == 0  # per key
    now[0] += 0.05
    assert limiter.try_take("a") == pytest.approx(0.05)
    now[0] += 0.05
    assert limiter.try_take("a") == 0
    now[0] += 100  # refills up to the burst, no more
    assert [limiter.try_take("a") for _ in range(3)][2] > 0
