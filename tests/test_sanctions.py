"""Sanctions at the point of sale (issue 16) over real gRPC and real Redis, on both backends (a
single redis-server, where the check is inside the settlement's own Lua call, and a real Redis
Cluster, where each server's view judges within its freshness bound): suspend / lift / expire,
person sanctions at every site, CheckCodes notices, idempotent admin calls, bad input, the audit
stream, the concurrent race, and bulk jobs judging each settlement at its own time."""
from __future__ import annotations

import concurrent.futures
import csv
import threading
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from tracecode.clients.pos import PosClient, line
from tracecode.clients.reverify import run_job
from tracecode.rules.pseudonym import Pseudonymizer
from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, issuance, load
from helpers import AuditTail, verdicts

P = "8123456"
BOUND_S = 1.0  # a sanction binds on every server within this (issue 16)
_ids = iter(range(1, 10**9))


def rid() -> str:
    return f"req-{time.time_ns()}-{next(_ids)}"


def codes(admin, n: int) -> list[str]:
    cs = [cn20() for _ in range(n)]
    load(admin, *(issuance(c, P) for c in cs))
    return cs


def refusal(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
    status = rpc_status.from_call(exc)
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info)
    return info


def violations(exc: grpc.RpcError) -> dict[str, str]:
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    status = rpc_status.from_call(exc)
    detail = error_details_pb2.BadRequest()
    assert status.details and status.details[0].Unpack(detail)
    return {v.field: v.description for v in detail.field_violations}


def settle_or_refusal(pos: PosClient, site: str, code: str, insured: str = ""):
    """('OK'|verdict, None) or ('REFUSED', ErrorInfo)."""
    try:
        resp = pos.verify(site, [line(code, P)], insured_id=insured)
        return pb.Verdict.Name(resp.results[0].verdict), None
    except grpc.RpcError as exc:
        return "REFUSED", refusal(exc)


def wait_refused(pos, site, code_pool, insured="", bound=BOUND_S):
    """Settle fresh codes until one is refused; returns (seconds it took, ErrorInfo). Accepted
    ones use up their code (it is dispensed)."""
    start = time.monotonic()
    while True:
        code = code_pool.pop()
        outcome, info = settle_or_refusal(pos, site, code, insured)
        if outcome == "REFUSED":
            code_pool.append(code)  # not marked: still sellable
            return time.monotonic() - start, info
        assert time.monotonic() - start < bound, "sanction did not bind within the bound"
        time.sleep(0.01)


def metric(name, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ------------------------------------------------------------------ site sanctions

def test_suspended_site_is_refused_nothing_marked_then_lift_accepts(pos, admin, store):
    site = "PH-SUS-1"
    pool = codes(admin, 20)
    refused_before = metric("tracecode_sanction_refusals_total", reason="SITE_SANCTIONED")
    tail = AuditTail(store)
    s = admin.set_sanction("SUSPEND_SERVICE", request_id=rid(), site_id=site, reason="倒卖医保药品",
                           reference="LEAD-42", actor="supervisor-wang")
    assert s.in_force and s.subject == apb.SITE and s.subject_id == site and s.sanction_id.startswith("sx-")
    took, info = wait_refused(pos, site, pool)
    assert info.reason == "SITE_SANCTIONED" and info.domain == "tracecode.v1"
    assert info.metadata["kind"] == "SUSPEND_SERVICE" and info.metadata["sanction_id"] == s.sanction_id
    assert info.metadata["reference"] == "LEAD-42" and info.metadata["since"] and info.metadata["until"] == ""
    # Nothing marked: the refused code is untouched and the message is for a pharmacist.
    code = pool.pop()
    hist = pos.history(code)
    assert hist.units_used == 0 and not hist.events
    try:
        pos.verify(site, [line(code, P)])
    except grpc.RpcError as exc:
        assert "refused, nothing recorded" in exc.details() and "暂停医保服务" in exc.details()
        assert "LEAD-42" in exc.details()
    assert metric("tracecode_sanction_refusals_total", reason="SITE_SANCTIONED") >= refused_before + 2
    events = tail.new()
    set_ev = [e for e in events if e["t"] == "SANCTION_SET"]
    assert len(set_ev) == 1 and set_ev[0]["n"] == s.sanction_id and set_ev[0]["r"] == "LEAD-42"
    refused = [e for e in events if e["t"] == "REFUSED"]
    assert refused and all(e["n"] == s.sanction_id and e["s"] == site and e["x"] == "SITE_SANCTIONED"
                           for e in refused)
    # Another site is not affected.
    assert settle_or_refusal(pos, "PH-OTHER-1", pool.pop())[0] == "OK"

    lifted = admin.lift_sanction(s.sanction_id, reason="整改完成", actor="supervisor-li")
    assert not lifted.in_force and lifted.lifted_by == "supervisor-li" and lifted.HasField("lifted_at")
    deadline = time.monotonic() + BOUND_S
    while settle_or_refusal(pos, site, code)[0] != "OK":  # the refused code sells now
        assert time.monotonic() < deadline, "lift did not take effect within the bound"
        time.sleep(0.01)
    assert any(e["t"] == "SANCTION_LIFTED" and e["n"] == s.sanction_id for e in tail.new())
    # Lifting again is a no-op returning it unchanged.
    again = admin.lift_sanction(s.sanction_id, reason="twice")
    assert again.lifted_at == lifted.lifted_at and again.lift_reason == "整改完成"


@pytest.mark.parametrize("kind", ["TERMINATE_AGREEMENT", "BLACKLIST"])
def test_terminated_and_blacklisted_sites_are_refused_until_lifted(pos, admin, kind):
    site = f"PH-{kind[:4]}"
    pool = codes(admin, 10)
    s = admin.set_sanction(kind, request_id=rid(), site_id=site, reason="r")
    _, info = wait_refused(pos, site, pool)
    assert info.metadata["kind"] == kind
    admin.lift_sanction(s.sanction_id, reason="restored")
    deadline = time.monotonic() + BOUND_S
    while settle_or_refusal(pos, site, pool[-1])[0] != "OK":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_suspension_with_an_end_stops_binding_on_its_own(pos, admin):
    site = "PH-UNTIL"
    pool = codes(admin, 30)
    until = datetime.now(timezone.utc) + timedelta(seconds=2.0)
    s = admin.set_sanction("SUSPEND_SERVICE", request_id=rid(), site_id=site, valid_until=until, reason="r")
    assert s.valid_until.ToDatetime(tzinfo=timezone.utc) == until.replace(microsecond=until.microsecond // 1000 * 1000)
    _, info = wait_refused(pos, site, pool)
    assert info.metadata["until"]
    while datetime.now(timezone.utc) < until - timedelta(seconds=0.6):
        assert settle_or_refusal(pos, site, pool[-1])[0] == "REFUSED"
        time.sleep(0.1)
    time.sleep(max((until - datetime.now(timezone.utc)).total_seconds(), 0) + 0.05)
    outcome, info = settle_or_refusal(pos, site, pool[-1])
    assert outcome == "OK", (info, datetime.now(timezone.utc), until)
    assert not admin.list_sanctions(site_id=site)  # no longer in force
    assert [x.sanction_id for x in admin.list_sanctions(site_id=site, include_history=True)] == [s.sanction_id]


def test_suspension_starting_later_binds_from_its_start(pos, admin):
    site = "PH-LATER"
    pool = codes(admin, 30)
    start = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    s = admin.set_sanction("SUSPEND_SERVICE", request_id=rid(), site_id=site, valid_from=start, reason="r")
    assert not s.in_force
    assert settle_or_refusal(pos, site, pool.pop())[0] == "OK"
    time.sleep(max((start - datetime.now(timezone.utc)).total_seconds(), 0))
    wait_refused(pos, site, pool)


def test_retry_of_a_settlement_recorded_before_the_sanction_replays(pos, admin):
    site = "PH-RETRY"
    code = codes(admin, 1)[0]
    at = datetime.now(timezone.utc)
    first = pos.verify(site, [line(code, P)], settlement_id="S-BEFORE", settled_at=at, insured_id="P-R")
    admin.set_sanction("BLACKLIST", request_id=rid(), site_id=site, reason="r")
    time.sleep(BOUND_S)  # the cluster's view has it by now
    again = pos.verify(site, [line(code, P)], settlement_id="S-BEFORE", settled_at=at, insured_id="P-R")
    assert again.replayed and verdicts(again) == verdicts(first) == ["OK"]


# ------------------------------------------------------------------ insured persons

def test_suspended_person_is_refused_at_every_site_check_codes_says_so(pos, admin, store, config):
    person, other = "110101199003077774", "110101199003078881"
    pool = codes(admin, 20)
    s = admin.set_sanction("SUSPEND_CARD", request_id=rid(), insured_id=f"  {person.lower()} ",
                           reason="冒用医保卡", reference="CASE-7")
    pseudonym = Pseudonymizer.from_file(config.pseudonym_key_file).pseudonym(person)
    assert s.subject == apb.INSURED and s.subject_id == pseudonym  # normalised, never the raw id
    for site in ("PH-A-1", "PH-B-1"):
        _, info = wait_refused(pos, site, pool, insured=person)
        assert info.reason == "INSURED_SANCTIONED" and info.metadata["sanction_id"] == s.sanction_id
        assert settle_or_refusal(pos, site, pool.pop(), insured=other)[0] == "OK"
    # CheckCodes tells, refusing nothing and marking nothing.
    code = pool.pop()
    resp = pos.check([line(code, P)], site_id="PH-A-1", insured_id=person)
    assert verdicts(resp) == ["OK"] and len(resp.sanctions) == 1
    n = resp.sanctions[0]
    assert (n.reason, n.kind, n.sanction_id, n.reference) == ("INSURED_SANCTIONED", "SUSPEND_CARD", s.sanction_id, "CASE-7")
    assert not pos.check([line(code, P)], site_id="PH-A-1", insured_id=other).sanctions
    assert pos.history(code).units_used == 0
    # Listed by raw id (the server computes the pseudonym) or by pseudonym.
    assert [x.sanction_id for x in admin.list_sanctions(insured_id=person)] == [s.sanction_id]
    assert [x.sanction_id for x in admin.list_sanctions(insured_pseudonym=pseudonym)] == [s.sanction_id]


def test_site_and_person_both_sanctioned_site_named_first(pos, admin):
    site, person = "PH-BOTH", "X-BOTH-1"
    pool = codes(admin, 10)
    admin.set_sanction("SUSPEND_CARD", request_id=rid(), insured_id=person, reason="r")
    admin.set_sanction("SUSPEND_SERVICE", request_id=rid(), site_id=site, reason="r")
    time.sleep(BOUND_S)
    _, info = wait_refused(pos, site, pool, insured=person)
    assert info.reason == "SITE_SANCTIONED"
    resp = pos.check([line(pool[-1], P)], site_id=site, insured_id=person)
    assert [n.reason for n in resp.sanctions] == ["SITE_SANCTIONED", "INSURED_SANCTIONED"]


def test_first_buyer_pseudonym_in_history_not_in_another_pos_evidence(pos, admin, config):
    code = codes(admin, 1)[0]
    pseudonym = Pseudonymizer.from_file(config.pseudonym_key_file).pseudonym("BUYER-1")
    pos.verify("PH-FIRST", [line(code, P)], insured_id="BUYER-1")
    dup = pos.verify("PH-SECOND", [line(code, P)], insured_id="BUYER-2")
    assert verdicts(dup) == ["DUPLICATE"]
    ev = dup.results[0].evidence
    assert ev.first_site_id == "PH-FIRST" and ev.first_insured_id == ""
    assert "BUYER" not in str(dup) and pseudonym not in str(dup)
    # Without authentication every caller is trusted: the full history (test_sanction_auth has
    # the pharmacy's narrowed view).
    hist = pos.history(code)
    assert hist.first_insured_id == hist.first_dispense.first_insured_id == pseudonym
    assert [e.insured_id for e in hist.events][0] == pseudonym


def test_an_insured_id_is_part_of_the_settlement_body(pos, admin):
    code = codes(admin, 1)[0]
    pos.verify("PH-BODY", [line(code, P)], settlement_id="S-BODY", insured_id="P-1")
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("PH-BODY", [line(code, P)], settlement_id="S-BODY", insured_id="P-2")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_settlements_without_insured_id_keep_working_and_are_counted(pos, admin):
    before = metric("tracecode_settlements_without_insured_total")
    assert verdicts(pos.verify("PH-OLD", [line(codes(admin, 1)[0], P)])) == ["OK"]
    assert metric("tracecode_settlements_without_insured_total") == before + 1


# ------------------------------------------------------------------ admin API

def test_set_sanction_is_idempotent_on_request_id(admin, store):
    req = rid()
    tail = AuditTail(store)
    a = admin.set_sanction("SUSPEND_SERVICE", request_id=req, site_id="PH-IDEM", reason="r", reference="L1")
    b = admin.set_sanction("SUSPEND_SERVICE", request_id=req, site_id="PH-IDEM", reason="r", reference="L1")
    assert a == b
    assert len([e for e in tail.new() if e["t"] == "SANCTION_SET"]) == 1
    with pytest.raises(grpc.RpcError) as err:
        admin.set_sanction("SUSPEND_SERVICE", request_id=req, site_id="PH-IDEM", reason="other", reference="L1")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(admin.list_sanctions(site_id="PH-IDEM", include_history=True)) == 1
    assert [x.sanction_id for x in admin.list_sanctions(reference="L1")] == [a.sanction_id]
    with pytest.raises(grpc.RpcError) as err:
        admin.lift_sanction("sx-" + "0" * 20, reason="r")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _long(n):
    return "9" * n


@pytest.mark.parametrize("kw, field", [
    (dict(kind="SANCTION_KIND_UNSPECIFIED", site_id="PH-BAD"), "kind"),
    (dict(kind=99, site_id="PH-BAD"), "kind"),
    (dict(kind="SUSPEND_SERVICE", site_id=""), "site_id"),
    (dict(kind="SUSPEND_CARD", insured_id="   "), "insured_id"),
    (dict(kind="SUSPEND_CARD", insured_id=_long(65)), "insured_id"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH BAD"), "site_id"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", until=-10), "valid_until"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", frm=100, until=50), "valid_until"),
    (dict(kind="BLACKLIST", site_id="PH-BAD", until=100), "valid_until"),
    (dict(kind="SUSPEND_CARD", site_id="PH-BAD", insured_id="X1"), "site_id"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", request_id=""), "request_id"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", reason=""), "reason"),
    # Issue 23, 2: control and bidirectional-override characters in admin text (a forged log line).
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", actor="evil\nINFO forged\x00"), "actor"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", reason="r\x00\x1b[31m"), "reason"),
    (dict(kind="SUSPEND_SERVICE", site_id="PH-BAD", reference="\u202eCASE-7"), "reference"),
    # Issue 23, 1: an id no documented format admits (Cyrillic Х; a wrong GB 11643 check character).
    (dict(kind="SUSPEND_CARD", insured_id="11010519491231002\u0425"), "insured_id"),
    (dict(kind="SUSPEND_CARD", insured_id="110105194912310021"), "insured_id"),
])
def test_bad_sanction_requests_are_invalid_argument_and_change_nothing(admin, store, kw, field):
    tail = AuditTail(store)
    now = datetime.now(timezone.utc)
    kind = kw["kind"]
    req = apb.SetSanctionRequest(
        request_id=kw.get("request_id", rid()), kind=kind if isinstance(kind, int) else apb.SanctionKind.Value(kind),
        site_id=kw.get("site_id", ""), insured_id=kw.get("insured_id", ""), reason=kw.get("reason", "r"),
        reference=kw.get("reference", ""), actor=kw.get("actor", ""))
    if "frm" in kw:
        req.valid_from.FromDatetime(now + timedelta(seconds=kw["frm"]))
    if "until" in kw:
        req.valid_until.FromDatetime(now + timedelta(seconds=kw["until"]))
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.SetSanction(req, timeout=5)
    bad = violations(err.value)
    assert field in bad
    if kw.get("insured_id", "").strip():  # the reason names the rule, never the id
        assert kw["insured_id"][:12] not in bad[field] and kw["insured_id"] not in str(err.value)
    assert not admin.list_sanctions(include_history=True)
    assert not tail.new()


def test_bad_lift_and_bad_insured_id_on_settlement(admin, pos):
    with pytest.raises(grpc.RpcError) as err:
        admin.lift_sanction("not-an-id", reason="r")
    assert "sanction_id" in violations(err.value)
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("PH-LONG", [line(cn20(), P)], insured_id=_long(65))
    assert "insured_id" in violations(err.value)


# Issue 23, 1: each spelling a probe settled OK while the person's card was suspended. NFKC
# folds the full-width forms; spaces, zero-width and format characters and dashes go; the case
# of the check character does not matter. The other forms are no id at all: refused as invalid.
SUSPENDED = "11010519491231002X"
SAME_PERSON = ["１１０１０５１９４９１２３１００２Ｘ", "11010519491231002Ｘ", "1101051949\u200b1231002X",
               "\ufeff11010519491231002X", "110105 19491231 002X", "110105-19491231-002x", "\u3000110105194912310 02x"]
NOT_AN_ID = ["11010519491231002X\x00", "11010519491231002\u0425", "011010519491231002X", "1101051949123100"]


def test_every_spelling_of_a_suspended_id_is_refused_none_settles(pos, admin, config):
    s = admin.set_sanction("SUSPEND_CARD", request_id=rid(), insured_id=SUSPENDED, reason="冒用医保卡")
    pool = codes(admin, 4 * (len(SAME_PERSON) + len(NOT_AN_ID)) + 4)
    wait_refused(pos, "PH-SPELL", pool, insured=SUSPENDED)
    for variant in SAME_PERSON:
        outcome, info = settle_or_refusal(pos, "PH-SPELL", pool.pop(), insured=variant)
        assert outcome == "REFUSED" and info.metadata["sanction_id"] == s.sanction_id, ascii(variant)
        assert [n.sanction_id for n in pos.check([line(pool[-1], P)], site_id="PH-SPELL",
                                                 insured_id=variant).sanctions] == [s.sanction_id]
        assert [x.sanction_id for x in admin.list_sanctions(insured_id=variant)] == [s.sanction_id]
    for variant in NOT_AN_ID:
        code = pool.pop()
        with pytest.raises(grpc.RpcError) as err:
            pos.verify("PH-SPELL", [line(code, P)], insured_id=variant)
        assert "insured_id" in violations(err.value), ascii(variant)
        assert variant not in str(err.value.details())
        assert pos.history(code).units_used == 0


def test_an_id_of_only_spaces_is_no_id(pos, admin):
    """Counted as a settlement without an insured person, and bound by no card suspension."""
    counter = "tracecode_settlements_without_insured_total"
    code = codes(admin, 1)[0]
    before = REGISTRY.get_sample_value(counter) or 0.0
    resp = pos.verify("PH-BLANK", [line(code, P)], insured_id=" \u3000\t ")
    assert verdicts(resp) == ["OK"]
    assert (REGISTRY.get_sample_value(counter) or 0.0) == before + 1


def test_control_and_override_characters_in_stored_text_are_refused(pos, admin):
    code = codes(admin, 1)[0]
    for product in ("8123456\u202e", "81\x0023456", "8123456\u2066"):
        with pytest.raises(grpc.RpcError) as err:
            pos.verify("PH-TEXT", [line(code, product)])
        assert "lines[0].product_id" in violations(err.value)
    with pytest.raises(grpc.RpcError) as err:
        admin.set_status(code, "RECALLED", reason="recall\nINFO forged")
    assert "reason" in violations(err.value)
    with pytest.raises(grpc.RpcError) as err:
        admin.recall(P, "B\x1b1")
    assert "batch" in violations(err.value)
    assert pos.history(code).units_used == 0 and admin.get(code).status == pb.ACTIVE


# ------------------------------------------------------------------ the race

def test_sanction_set_while_200_settlements_are_in_flight(pos, admin, target, redis_server):
    """No settlement that started after the sanction's acknowledgement is accepted (single node);
    on the cluster none that started more than the bound after it."""
    site = "PH-RACE"
    pool = codes(admin, 200)
    barrier = threading.Barrier(17)
    ack = {}

    def sanction():
        barrier.wait()
        time.sleep(0.02)
        s = admin.set_sanction("SUSPEND_SERVICE", request_id=rid(), site_id=site, reason="race")
        ack["t"] = time.time()
        return s

    def settle(batch):
        out = []
        with PosClient(target, deadline_s=10, retries=0) as client:
            barrier.wait()
            for code in batch:
                started = time.time()
                outcome, _ = settle_or_refusal(client, site, code)
                out.append((started, time.time(), outcome, code))
        return out

    batches = [pool[i::16] for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(17) as ex:
        s_future = ex.submit(sanction)
        results = [r for f in [ex.submit(settle, b) for b in batches] for r in f.result()]
        s_future.result()
    assert len(results) == 200
    allowed = 0.0 if not redis_server.cluster else BOUND_S
    late_ok = [r for r in results if r[0] > ack["t"] + allowed and r[2] == "OK"]
    assert not late_ok, late_ok[:3]
    refused = [r for r in results if r[2] == "REFUSED"]
    accepted = [r for r in results if r[2] == "OK"]
    assert refused, "the sanction never bound during the run"
    # Refused settlements marked nothing; accepted ones did.
    assert all(pos.history(code).units_used == 0 for *_, code in refused[:20])
    assert all(pos.history(code).units_used == 1 for *_, code in accepted[:20])


# ------------------------------------------------------------------ bulk jobs

def test_bulk_jobs_judge_each_settlement_against_the_sanctions_of_its_time(tmp_path, admin, target):
    site, person = "PH-HIST", "HIST-PERSON-1"
    cs = codes(admin, 6)
    s = admin.set_sanction("SUSPEND_SERVICE", request_id=rid(), site_id=site, reason="r", reference="LEAD-H")
    card = admin.set_sanction("SUSPEND_CARD", request_id=rid(), insured_id=person, reason="r")
    time.sleep(0.05)
    during = datetime.now(timezone.utc)
    time.sleep(0.05)
    admin.lift_sanction(s.sanction_id, reason="lifted")
    time.sleep(1.2)  # every view has the lift
    after = datetime.now(timezone.utc)
    before = during - timedelta(days=30)  # last month: before the sanction existed
    rows = [("H1", before, cs[0], ""), ("H2", during, cs[1], ""), ("H3", after, cs[2], ""),
            ("H4", before, cs[3], person), ("H5", after, cs[4], person)]
    path = tmp_path / "hist.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units", "insured_id"])
        for sid, at, code, ins in rows:
            w.writerow([site if sid != "H5" else "PH-ELSEWHERE", sid, at.isoformat(), 1, code, P, 0, ins])
    for mode in ("check", "replay"):
        out = tmp_path / mode
        summary = run_job(target, [str(path)], str(out), job_id=f"hist-{mode}", mode=mode, progress=False)
        with open(out / "flagged.csv", encoding="utf-8") as fh:
            flagged = {r["settlement_id"]: r for r in csv.DictReader(fh)}
        assert set(flagged) == {"H2", "H5"}, (mode, flagged)
        assert flagged["H2"]["sanction"] == "SITE_SANCTIONED" and flagged["H2"]["sanction_id"] == s.sanction_id
        assert flagged["H5"]["sanction"] == "INSURED_SANCTIONED" and flagged["H5"]["sanction_id"] == card.sanction_id
        assert summary["sanctioned_settlements"] == {"INSURED_SANCTIONED": 1, "SITE_SANCTIONED": 1}
        assert person not in (out / "flagged.csv").read_text()


# ------------------------------------------------------------------ freshness

def test_a_stale_view_is_reported_and_on_a_cluster_settles_nothing(server, pos, admin, redis_server):
    code = codes(admin, 1)[0]
    view = server.sanctions.view
    view.stop()  # the view can no longer follow the changes
    time.sleep(view.max_age_s + 0.3)
    assert view.age_s() > view.max_age_s
    assert REGISTRY.get_sample_value("tracecode_sanction_view_age_seconds") > view.max_age_s
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(pos.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    if redis_server.cluster:
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            pos.verify("PH-STALE", [line(code, P)])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert pos.history(code).units_used == 0
    else:  # one node: the settlement's own call judges sanctions; the view only serves bulk jobs
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert verdicts(pos.verify("PH-STALE", [line(code, P)])) == ["OK"]


def test_first_buyer_pseudonym_kept_by_an_all_or_nothing_settlement_over_several_slots(pos, admin, config, store):
    """On a cluster the codes of one settlement sit in several slots: prepare and commit
    (two-phase) still keep the first buyer's pseudonym."""
    from tracecode.server.store import slot_of
    cs = codes(admin, 12)
    chosen = [cs[0]] + [c for c in cs[1:] if slot_of(c) != slot_of(cs[0])][:1]
    assert len(chosen) == 2
    resp = pos.verify("PH-AON", [line(c, P) for c in chosen], all_or_nothing=True, insured_id="AON-BUYER")
    assert verdicts(resp) == ["OK", "OK"] and resp.recorded
    pseudonym = Pseudonymizer.from_file(config.pseudonym_key_file).pseudonym("AON-BUYER")
    for c in chosen:
        hist = pos.history(c)
        assert hist.first_insured_id == pseudonym
        assert [e.insured_id for e in hist.events] == [pseudonym]


def test_a_card_suspension_can_name_the_person_by_pseudonym(pos, admin, config):
    """A caller that keeps only pseudonyms (the ledger console) suspends a card without the raw
    id; the sanction binds on the person's settlements like one set by raw id."""
    person = "110101199003079999"
    pseudonym = Pseudonymizer.from_file(config.pseudonym_key_file).pseudonym(person)
    pool = codes(admin, 6)
    s = admin.set_sanction("SUSPEND_CARD", request_id=rid(), insured_pseudonym=pseudonym, reason="倒卖医保药品",
                           reference="LEAD-9")
    assert s.subject == apb.INSURED and s.subject_id == pseudonym
    _, info = wait_refused(pos, "PH-P-1", pool, insured=person)
    assert info.reason == "INSURED_SANCTIONED" and info.metadata["sanction_id"] == s.sanction_id
    # Wrong shapes, another key's pseudonym, both forms at once, or a site sanction: refused.
    other_key = Pseudonymizer(b"z" * 32, "zz").pseudonym(person)
    for kind, fields, bad in (("SUSPEND_CARD", {"insured_pseudonym": "k1.nothex"}, "insured_pseudonym"),
                              ("SUSPEND_CARD", {"insured_pseudonym": other_key}, "insured_pseudonym"),
                              ("SUSPEND_CARD", {"insured_pseudonym": pseudonym, "insured_id": person}, "insured_pseudonym"),
                              ("SUSPEND_SERVICE", {"insured_pseudonym": pseudonym, "site_id": "PH-P-2"}, "insured_id")):
        with pytest.raises(grpc.RpcError) as err:
            admin.set_sanction(kind, request_id=rid(), reason="x", **fields)
        assert bad in violations(err.value), (fields, violations(err.value))
