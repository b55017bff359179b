"""The holes found by probing (issue 14), each closed and checked over real gRPC and Redis:
an injective idempotency digest, control characters refused with a reason, unknown enum values
and invalid Timestamps refused, issuance fields held to settlement's limits, and a reload that
cannot shrink a pack below what it already dispensed."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tracecode.clients.pos import line
from tracecode.server.verifier import Line, Verifier
from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import admin_pb2_grpc
from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc

from factories import cn20, issuance, load
from test_limits import refusal, violations

P = "8123456"


def _request(sid: str, lines, policy=pb.RECORD_ACCEPTED, at: datetime | None = None):
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at or datetime.now(timezone.utc))
    return pb.VerifyDispenseRequest(settlement_id=sid, site_id="PROBE-A", settled_at=ts,
                                    lines=list(lines), policy=policy)


def test_digest_is_injective_over_field_boundaries():
    # Two bodies whose fields, joined with the old separators, read the same.
    one = [Line("X", "P\x1f0\x1eY", 0)]
    two = [Line("X", "P", 0), Line("Y", "P", 0)]
    assert Verifier.digest("S", "1", 5, False, one) != Verifier.digest("S", "1", 5, False, two)
    # Raw scans may hold any character (they are then MALFORMED, but part of the body).
    a = [Line("A\x1fP\x1f0\x1eB", "P", 0)]
    b = [Line("A", "P", 0), Line("B", "P", 0)]
    assert Verifier.digest("S", "1", 5, False, a) != Verifier.digest("S", "1", 5, False, b)
    # Every field matters, including the number of lines and the policy.
    base = Verifier.digest("S", "1", 5, False, b)
    assert len({base, Verifier.digest("S", "1", 5, True, b), Verifier.digest("S", "1", 6, False, b),
                Verifier.digest("S", "2", 5, False, b), Verifier.digest("T", "1", 5, False, b),
                Verifier.digest("S", "1", 5, False, b[:1])}) == 6


def test_the_reported_digest_collision_is_refused(target, admin):
    c1, c2 = cn20(), cn20()
    load(admin, issuance(c1, P), issuance(c2, P))
    stub = verification_pb2_grpc.VerificationStub(grpc.insecure_channel(target))
    at = datetime.now(timezone.utc)
    # The reported pair: a product id carrying the separators and the code of line 2.
    crafted = _request("COLL-1", [pb.DispenseLine(raw_code=c1, product_id=f"P\x1f0\x1e{c2}\x1fP")], at=at)
    err = refusal(lambda: stub.VerifyDispense(crafted))
    assert violations(err) == {"lines[0].product_id": "control character U+001F at position 2"}
    honest = _request("COLL-1", [pb.DispenseLine(raw_code=c1, product_id="P"),
                                 pb.DispenseLine(raw_code=c2, product_id="P")], at=at)
    out = stub.VerifyDispense(honest)
    assert not out.replayed and len(out.results) == 2
    # The same collision through the raw code: the crafted scan is a MALFORMED line of its own
    # body, and the two-line body under the same id is another body (ALREADY_EXISTS).
    c3, c4 = cn20(), cn20()
    load(admin, issuance(c3, P), issuance(c4, P))
    first = stub.VerifyDispense(_request("COLL-2", [pb.DispenseLine(raw_code=f"{c3}\x1fP\x1f0\x1e{c4}",
                                                                    product_id="P")], at=at))
    assert [r.verdict for r in first.results] == [pb.MALFORMED]
    err = refusal(lambda: stub.VerifyDispense(_request("COLL-2", [pb.DispenseLine(raw_code=c3, product_id="P"),
                                                                    pb.DispenseLine(raw_code=c4, product_id="P")],
                                                       at=at)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.backend_independent
@pytest.mark.parametrize("bad", ["\x00", "\x1e", "\x7f", "\x85", "\n"])
def test_control_characters_in_product_ids_are_invalid_argument(pos, bad):
    err = refusal(lambda: pos.verify("PROBE-A", [line(cn20(), f"P{bad}1")]))
    assert violations(err) == {"lines[0].product_id": f"control character U+{ord(bad):04X} at position 2"}


@pytest.mark.backend_independent
def test_control_characters_in_codes_are_malformed_with_a_reason(pos, admin):
    code = cn20()
    load(admin, issuance(code, P))
    res = pos.verify("PROBE-A", [line(code + "\x1f", P)]).results[0]
    assert res.verdict == pb.MALFORMED and "U+001F" in res.reason
    assert pos.history(code).units_used == 0


@pytest.mark.backend_independent
@pytest.mark.parametrize("policy", [3, 99, -5])
def test_unknown_policy_is_invalid_argument_and_marks_nothing(target, admin, pos, policy):
    code = cn20()
    load(admin, issuance(code, P))
    stub = verification_pb2_grpc.VerificationStub(grpc.insecure_channel(target))
    err = refusal(lambda: stub.VerifyDispense(_request(f"POL-{policy % 1000}", [pb.DispenseLine(raw_code=code, product_id=P)],
                                                       policy=policy)))
    assert violations(err) == {"policy": f"unknown value {policy}: RECORD_ACCEPTED or ALL_OR_NOTHING"}
    assert pos.history(code).units_used == 0


@pytest.mark.backend_independent
@pytest.mark.parametrize("nanos", [-1, 1_000_000_000, 2_000_000_000])
def test_invalid_timestamp_nanos_is_invalid_argument(target, admin, pos, nanos):
    code = cn20()
    load(admin, issuance(code, P))
    stub = verification_pb2_grpc.VerificationStub(grpc.insecure_channel(target))
    req = _request("NANOS-1", [pb.DispenseLine(raw_code=code, product_id=P)])
    req.settled_at.nanos = nanos
    err = refusal(lambda: stub.VerifyDispense(req))
    assert violations(err) == {"settled_at.nanos": f"{nanos} outside 0..999999999"}
    check = pb.CheckCodesRequest(lines=[pb.DispenseLine(raw_code=code, product_id=P)])
    check.at.seconds, check.at.nanos = 1_700_000_000, nanos
    assert violations(refusal(lambda: stub.CheckCodes(check))) == {"at.nanos": f"{nanos} outside 0..999999999"}
    assert pos.history(code).units_used == 0


@pytest.mark.backend_independent
def test_unknown_recall_status_is_invalid_argument(target):
    stub = admin_pb2_grpc.AdminStub(grpc.insecure_channel(target))
    err = refusal(lambda: stub.RecallBatch(apb.RecallBatchRequest(product_id=P, batch="B1", status=99)))
    assert "status" in violations(err)


@pytest.mark.parametrize("field,value,why", [
    ("product_id", "P" * 65, "product_id: 65 characters, at most 64"),
    ("product_id", "P\x1f1", "product_id: control character U+001F at position 2"),
    ("batch", "B" * 10_000, "batch: 10000 characters, at most 64"),
    ("batch", "B\n1", "batch: control character U+000A at position 2"),
    ("manufacturer", "M" * 100_000, "manufacturer: 100000 characters, at most 200"),
])
@pytest.mark.backend_independent
def test_issuance_fields_have_settlement_limits(admin, field, value, why):
    code = cn20()
    fields = {"product_id": P, field: value}
    resp = admin.upsert([issuance(code, fields.pop("product_id"), **fields)], source="probe")
    assert (resp.rejected, resp.created) == (1, 0)
    assert [e.reason for e in resp.errors] == [why]
    with pytest.raises(grpc.RpcError) as err:
        admin.get(code)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reload_with_fewer_pack_units_than_used_is_a_record_error(admin, pos):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    assert pos.verify("PROBE-A", [line(code, P, 6)]).results[0].units_accepted == 6
    resp = admin.upsert([issuance(code, P, pack_units=5)], source="reload.csv")
    assert (resp.rejected, resp.updated) == (1, 0)
    assert "below the units already dispensed" in resp.errors[0].reason
    assert resp.errors[0].source == "reload.csv"
    assert admin.get(code).pack_units == 10  # the stored record is kept
    # At or above what is used, a reload goes through.
    assert admin.upsert([issuance(code, P, pack_units=6)]).updated == 1
    assert pos.verify("PROBE-A", [line(code, P, 1)]).results[0].verdict == pb.QUANTITY_EXCEEDED


@pytest.mark.backend_independent
def test_malformed_messages_are_counted_and_logged_at_most_once_a_second(target, caplog):
    from prometheus_client import REGISTRY

    def count() -> float:
        return REGISTRY.get_sample_value("tracecode_malformed_messages_total") or 0.0

    before = count()
    call = grpc.insecure_channel(target).unary_unary("/tracecode.v1.Verification/VerifyDispense",
                                                     request_serializer=None, response_deserializer=None)
    caplog.set_level("INFO", logger="grpc._common")
    started = time.monotonic()
    for _ in range(40):
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff\xff garbage", timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
    elapsed = time.monotonic() - started
    assert count() - before == 40
    lines = [r for r in caplog.records if r.name == "grpc._common"]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in lines)
    assert 1 <= len(lines) <= int(elapsed) + 1
    assert "could not be decoded" in lines[0].getMessage()


def test_pseudonym_many_is_pseudonym_per_id():
    from tracecode.rules.pseudonym import Pseudonymizer

    p = Pseudonymizer(b"k" * 32, "k2")
    ids = ["110105194912310021", " 11010519491231002x ", "", "   ", "ab-12"]
    assert p.pseudonym_many(ids) == [p.pseudonym(i) for i in ids]
    assert p.pseudonym(" 11010519491231002x ") == p.pseudonym("11010519491231002X")
    assert p.pseudonym("") == "" and Pseudonymizer.looks_like_pseudonym(p.pseudonym("a"))
