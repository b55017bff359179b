"""VerifyDispense over real gRPC and a real redis-server: each verdict, idempotency, evidence."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tracecode.clients.pos import line
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, gs1, gtin14, issuance, load


def verdicts(resp):
    return [pb.Verdict.Name(r.verdict) for r in resp.results]


def test_first_dispense_ok_then_duplicate_at_another_site_names_the_first(pos, admin):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    first = pos.verify("SITE-A", [line(code, "8123456")], settlement_id="s-1")
    assert verdicts(first) == ["OK"] and first.recorded
    assert first.results[0].canonical_code == code

    second = pos.verify("SITE-B", [line(code, "8123456")], settlement_id="s-1")
    r = second.results[0]
    assert verdicts(second) == ["DUPLICATE"] and not second.recorded
    assert r.evidence.first_site_id == "SITE-A"
    assert r.evidence.first_settlement_id == "s-1"
    assert abs(r.evidence.first_settled_at.seconds - datetime.now(timezone.utc).timestamp()) < 60
    assert r.evidence.attempts == 1
    # The reason names the first site and time for whichever pharmacy reads it, never the first
    # sale's settlement id (the evidence carries it to that site and to admins: docs/verification.md).
    assert "SITE-A" in r.reason and "s-1" not in r.reason
    # The pharmacist's reason, in Chinese, with the same facts and the same limits.
    assert "SITE-A" in r.reason_zh and "回流药" in r.reason_zh and "s-1" not in r.reason_zh
    assert first.results[0].reason_zh == ""

    third = pos.verify("SITE-C", [line(code, "8123456")])
    assert third.results[0].evidence.attempts == 2


def test_whole_pack_resold_at_the_same_site_is_a_duplicate(pos, admin):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    assert verdicts(pos.verify("SITE-A", [line(code, "8123456")])) == ["OK"]
    assert verdicts(pos.verify("SITE-A", [line(code, "8123456")])) == ["DUPLICATE"]


def test_unknown_code(pos):
    resp = pos.verify("SITE-A", [line(cn20(), "8123456")])
    assert verdicts(resp) == ["UNKNOWN"] and not resp.recorded
    assert resp.results[0].reason == "no issuance record for this code"


def test_malformed_code_has_a_reason_and_other_lines_still_count(pos, admin):
    good = cn20()
    load(admin, issuance(good, "8123456"))
    resp = pos.verify("SITE-A", [line("8123456789", "8123456"), line(good, "8123456")])
    assert verdicts(resp) == ["MALFORMED", "OK"] and resp.recorded
    assert "20-digit" in resp.results[0].reason and resp.results[0].canonical_code == ""


def test_gs1_pack_scanned_in_two_forms_is_one_pack(pos, admin):
    gtin = gtin14()
    code = gs1(gtin, "SER123", expiry="301231", batch="B1")
    load(admin, issuance(code, "P1", gtin=gtin))
    assert verdicts(pos.verify("SITE-A", [line(code, "P1")])) == ["OK"]
    raw = f"]d201{gtin}17301231\x1d10B1\x1d21SER123"
    resp = pos.verify("SITE-B", [line(raw, "P1")])
    assert verdicts(resp) == ["DUPLICATE"]
    assert resp.results[0].canonical_code == f"01{gtin}21SER123"


def test_retry_with_same_settlement_id_is_idempotent(pos, admin):
    a, b = cn20(), cn20()
    load(admin, issuance(a, "8123456", pack_units=10), issuance(b, "8123456"))
    lines = [line(a, "8123456", 2), line(b, "8123456")]
    when = datetime.now(timezone.utc)
    first = pos.verify("SITE-A", lines, settlement_id="retry-1", settled_at=when)
    again = pos.verify("SITE-A", lines, settlement_id="retry-1", settled_at=when)
    assert verdicts(first) == verdicts(again) == ["OK", "OK"]
    assert again.replayed and not first.replayed
    assert list(again.results) == list(first.results)
    hist = pos.history(a)
    assert hist.units_used == 2  # marked once, not twice
    assert [e.type for e in hist.events] == [pb.DISPENSED]


def test_same_settlement_id_with_another_body_is_already_exists(pos, admin):
    a = cn20()
    load(admin, issuance(a, "8123456"))
    when = datetime.now(timezone.utc)
    pos.verify("SITE-A", [line(a, "8123456")], settlement_id="dup-id", settled_at=when)
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("SITE-A", [line(cn20(), "8123456")], settlement_id="dup-id", settled_at=when)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "different request body" in err.value.details()
    # The same id at another site is another settlement.
    assert verdicts(pos.verify("SITE-B", [line(a, "8123456")], settlement_id="dup-id")) == ["DUPLICATE"]


def test_invalid_request_names_the_offending_fields(pos):
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("SITE A!", [line(cn20(), "")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    fields = {v.field for v in detail.field_violations}
    assert fields == {"site_id", "lines[0].product_id"}


def test_settlement_time_outside_the_skew_is_rejected(pos, admin):
    code = cn20()
    load(admin, issuance(code, "8123456"))
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("SITE-A", [line(code, "8123456")],
                   settled_at=datetime.now(timezone.utc) - timedelta(hours=2))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "settled_at" in err.value.details()
    assert verdicts(pos.verify("SITE-A", [line(code, "8123456")])) == ["OK"]  # nothing was marked


def test_late_retry_of_a_recorded_settlement_still_gets_its_answer(pos, admin, make_server):
    from tracecode.clients.pos import PosClient
    code = cn20()
    load(admin, issuance(code, "8123456"))
    when = datetime.now(timezone.utc) - timedelta(seconds=30)
    first = pos.verify("SITE-A", [line(code, "8123456")], settlement_id="late-1", settled_at=when)
    strict = make_server(clock_skew_s=5)  # the retry now arrives "too late" for this server
    with PosClient(strict) as late:
        again = late.verify("SITE-A", [line(code, "8123456")], settlement_id="late-1", settled_at=when)
    assert again.replayed and list(again.results) == list(first.results)


def test_a_redis_that_lost_its_scripts_gets_them_again_and_answers(pos, admin, store):
    """A restarted or newly promoted Redis has an empty script cache (Redis keeps none across
    restarts or failovers): the first call meets NOSCRIPT, the store loads the scripts and sends
    again, and the pharmacy sees an ordinary answer; a retry of the same settlement replays."""
    codes = [cn20() for _ in range(3)]
    load(admin, *(issuance(c, "8123456") for c in codes))
    assert verdicts(pos.verify("SITE-NS", [line(codes[0], "8123456")])) == ["OK"]
    store.r.script_flush()  # on every master of a cluster
    sale = dict(settlement_id="ns-1", settled_at=datetime.now(timezone.utc))
    resp = pos.verify("SITE-NS", [line(codes[1], "8123456"), line(codes[2], "8123456")], **sale)
    assert verdicts(resp) == ["OK", "OK"] and resp.recorded
    store.r.script_flush()
    again = pos.verify("SITE-NS", [line(codes[1], "8123456"), line(codes[2], "8123456")], **sale)
    assert again.replayed and verdicts(again) == ["OK", "OK"]
    assert verdicts(pos.verify("SITE-NS2", [line(codes[0], "8123456")])) == ["DUPLICATE"]


def test_every_flagged_verdict_has_a_chinese_reason(pos, admin):
    ok, locked, other = cn20(), cn20(), cn20()
    load(admin, issuance(ok, "8123456"), issuance(locked, "8123456", status="LOCKED"), issuance(other, "8999999"))
    resp = pos.verify("SITE-ZH", [line(ok, "8123456"), line(ok, "8123456"), line(locked, "8123456"),
                                  line(other, "8123456"), line(cn20(), "8123456"), line("12", "8123456")])
    assert verdicts(resp) == ["OK", "DUPLICATE_IN_REQUEST", "BLOCKED", "PRODUCT_MISMATCH", "UNKNOWN", "MALFORMED"]
    zh = [r.reason_zh for r in resp.results]
    assert zh[0] == "" and all(zh[1:])
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in z) for z in zh[1:])  # Chinese text, every one
    assert "8999999" in zh[3] and "追溯码无法识别" in zh[5]
