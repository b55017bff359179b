"""Every verdict and rule of the spec over real gRPC and a real redis-server: product swaps,
expiry on the Shanghai calendar, blocked statuses, duplicates inside a settlement, split packs,
the precedence table, settlement policies, read-only checks, history and the audit stream."""
from __future__ import annotations

import itertools
import re
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest

from tracecode.clients.pos import PosClient, line
from tracecode.rules.verdicts import PRECEDENCE
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, gs1, gtin14, issuance, load
from helpers import SHANGHAI, AuditTail, days, event_types, iso, shanghai_instant, today_shanghai, verdicts

P, Q = "8123456", "8999999"  # billed product ids: the issued one and another


def far_future() -> str:
    return iso(today_shanghai() + days(400))


# ------------------------------------------------------------------ PRODUCT_MISMATCH (串换)

def test_product_mismatch_names_the_issued_product_and_marks_nothing(pos, admin):
    code = cn20()
    load(admin, issuance(code, P))
    resp = pos.verify("SITE-A", [line(code, Q)])
    r = resp.results[0]
    assert verdicts(resp) == ["PRODUCT_MISMATCH"] and not resp.recorded
    assert r.issued_product_id == P and P in r.reason
    assert r.units_accepted == 0
    hist = pos.history(code)
    assert hist.units_used == 0
    assert event_types(hist) == ["DUPLICATE_ATTEMPT"] and hist.events[0].detail == "PRODUCT_MISMATCH"
    # Nothing was marked: billing the right product now is the first dispense.
    assert verdicts(pos.verify("SITE-A", [line(code, P)])) == ["OK"]


# ------------------------------------------------------------------ EXPIRED (Shanghai calendar)

def test_expiry_is_judged_on_the_settlement_date_in_shanghai(admin, make_server):
    # A pack expiring on D sells until D 23:59:59.999 Shanghai time and is EXPIRED from D+1 00:00.
    # D+1 00:00 in Shanghai is still D (16:00) in UTC, so a server judging in UTC would pass it.
    d = today_shanghai() - days(2)
    lenient = make_server(clock_skew_s=4 * 86400)  # accept settlement times two days back
    a, b = cn20(), cn20()
    load(admin, issuance(a, P, expiry=iso(d)), issuance(b, P, expiry=iso(d)))
    with PosClient(lenient) as pos:
        last_moment = pos.verify("SITE-A", [line(a, P)], settled_at=shanghai_instant(d, 23, 59, 59, 999))
        next_day = pos.verify("SITE-A", [line(b, P)], settled_at=shanghai_instant(d + days(1)))
        assert verdicts(last_moment) == ["OK"]
        assert verdicts(next_day) == ["EXPIRED"] and not next_day.recorded
        assert iso(d) in next_day.results[0].reason
        assert pos.history(b).units_used == 0


def test_expiry_today_sells_and_yesterday_is_expired_on_a_live_call(pos, admin):
    # "Today" is taken from the very settled_at sent, so a run across midnight cannot flake.
    now = datetime.now(timezone.utc)
    today = now.astimezone(SHANGHAI).date()
    fresh, stale = cn20(), cn20()
    load(admin, issuance(fresh, P, expiry=iso(today)), issuance(stale, P, expiry=iso(today - days(1))))
    resp = pos.verify("SITE-A", [line(fresh, P), line(stale, P)], settled_at=now)
    assert verdicts(resp) == ["OK", "EXPIRED"]


def test_the_issuers_time_zone_is_configurable(admin, make_server):
    # Same instant as above, D+1 00:00 in Shanghai, judged on a server whose issuer calendar is UTC:
    # there it is still day D, so the pack sells.
    d = today_shanghai() - days(2)
    code = cn20()
    load(admin, issuance(code, P, expiry=iso(d)))
    utc = make_server(clock_skew_s=4 * 86400, timezone="UTC")
    with PosClient(utc) as pos:
        assert verdicts(pos.verify("SITE-A", [line(code, P)], settled_at=shanghai_instant(d + days(1)))) == ["OK"]


def test_a_record_without_expiry_never_expires(pos, admin):
    code = cn20()
    load(admin, issuance(code, P))
    assert admin.get(code).expiry == ""
    assert verdicts(pos.verify("SITE-A", [line(code, P)])) == ["OK"]


def test_gs1_expiry_comes_from_ai_17_in_the_code(pos, admin):
    gtin = gtin14()
    yesterday = today_shanghai() - days(1)
    code = gs1(gtin, expiry=yesterday.strftime("%y%m%d"))
    load(admin, issuance(code, P))  # no expiry column: AI 17 is taken
    assert admin.get(code).expiry == iso(yesterday)
    assert verdicts(pos.verify("SITE-A", [line(code, P)])) == ["EXPIRED"]


# ------------------------------------------------------------------ BLOCKED

@pytest.mark.parametrize("status", ["RECALLED", "LOCKED", "STOLEN", "DESTROYED"])
def test_blocked_for_every_non_active_status_returns_the_status(pos, admin, status):
    code = cn20()
    load(admin, issuance(code, P, status=status))
    resp = pos.verify("SITE-A", [line(code, P)])
    r = resp.results[0]
    assert verdicts(resp) == ["BLOCKED"] and not resp.recorded
    assert pb.CodeStatus.Name(r.code_status) == status and status in r.reason
    assert pos.history(code).units_used == 0
    # Back to ACTIVE (an inquiry closed): the pack sells.
    admin.set_status(code, "ACTIVE", reason="inquiry closed")
    assert verdicts(pos.verify("SITE-A", [line(code, P)])) == ["OK"]


# ------------------------------------------------------------------ DUPLICATE_IN_REQUEST

def test_same_whole_pack_twice_in_one_settlement(pos, admin):
    code = cn20()
    load(admin, issuance(code, P))
    resp = pos.verify("SITE-A", [line(code, P), line(code, P)])
    assert verdicts(resp) == ["OK", "DUPLICATE_IN_REQUEST"] and resp.recorded
    assert resp.results[1].reason == "the same pack appears on an earlier line of this settlement"
    hist = pos.history(code)
    assert hist.units_used == 1
    assert event_types(hist) == ["DISPENSED", "DUPLICATE_ATTEMPT"]
    assert hist.events[1].detail == "DUPLICATE_IN_REQUEST" and hist.events[1].line_index == 1


def test_one_pack_scanned_in_two_forms_in_one_settlement(pos, admin):
    gtin = gtin14()
    code = gs1(gtin, "SERX1")
    load(admin, issuance(code, P))
    raw = f"]d201{gtin}21SERX1"
    resp = pos.verify("SITE-A", [line(code, P), line(raw, P)])
    assert verdicts(resp) == ["OK", "DUPLICATE_IN_REQUEST"]
    assert resp.results[0].canonical_code == resp.results[1].canonical_code


def test_split_lines_adding_up_within_the_pack_are_allowed(pos, admin):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    resp = pos.verify("SITE-A", [line(code, P, 3), line(code, P, 4), line(code, P, 3)])
    assert verdicts(resp) == ["OK", "OK", "OK"]
    assert [r.units_accepted for r in resp.results] == [3, 4, 3]
    # units_remaining is the pack after this settlement, on every line of it (proto contract).
    assert [r.units_remaining for r in resp.results] == [0, 0, 0]
    assert pos.history(code).units_used == 10


def test_split_lines_exceeding_the_pack_are_duplicate_in_request(pos, admin):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    resp = pos.verify("SITE-A", [line(code, P, 6), line(code, P, 5)])
    assert verdicts(resp) == ["OK", "DUPLICATE_IN_REQUEST"]
    assert pos.history(code).units_used == 6


@pytest.mark.parametrize("units", [(3, 0), (0, 3)], ids=["split-then-whole", "whole-then-split"])
def test_a_whole_pack_line_never_shares_its_pack_in_one_settlement(pos, admin, units):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    resp = pos.verify("SITE-A", [line(code, P, u) for u in units])
    assert verdicts(resp) == ["OK", "DUPLICATE_IN_REQUEST"]


# ------------------------------------------------------------------ split packs and QUANTITY_EXCEEDED

def test_same_site_continues_a_split_pack_until_used_up(pos, admin):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    first = pos.verify("SITE-A", [line(code, P, 7)], settlement_id="split-1")
    assert verdicts(first) == ["OK"] and first.results[0].units_remaining == 3

    too_many = pos.verify("SITE-A", [line(code, P, 4)])
    r = too_many.results[0]
    assert verdicts(too_many) == ["QUANTITY_EXCEEDED"] and not too_many.recorded
    assert r.units_remaining == 3 and "3 of 10" in r.reason
    assert r.evidence.first_site_id == "SITE-A" and r.evidence.first_settlement_id == "split-1"

    whole = pos.verify("SITE-A", [line(code, P)])  # a whole-pack line on a partly used pack
    assert verdicts(whole) == ["QUANTITY_EXCEEDED"]

    rest = pos.verify("SITE-A", [line(code, P, 3)])
    assert verdicts(rest) == ["OK"] and rest.results[0].units_remaining == 0
    # Used up: one more unit at the opening site asks more than remains...
    more = pos.verify("SITE-A", [line(code, P, 1)])
    assert verdicts(more) == ["QUANTITY_EXCEEDED"] and "0 of 10" in more.results[0].reason
    # ...while selling it whole again there is a resale, as is any touch from another site.
    assert verdicts(pos.verify("SITE-A", [line(code, P)])) == ["DUPLICATE"]
    assert verdicts(pos.verify("SITE-A", [line(code, P, 10)])) == ["DUPLICATE"]
    assert verdicts(pos.verify("SITE-B", [line(code, P, 1)])) == ["DUPLICATE"]
    assert pos.history(code).units_used == 10


def test_asking_more_units_than_the_pack_holds_is_quantity_exceeded(pos, admin):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    assert verdicts(pos.verify("SITE-A", [line(code, P, 11)])) == ["QUANTITY_EXCEEDED"]
    assert pos.history(code).units_used == 0


def test_units_beyond_the_configured_maximum_are_invalid_argument(pos, admin, config):
    code = cn20()
    load(admin, issuance(code, P))
    with pytest.raises(grpc.RpcError) as err:
        pos.verify("SITE-A", [line(code, P, config.max_units + 1)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lines[0].units" in err.value.details()


def test_another_site_touching_a_split_pack_gets_duplicate_with_evidence(pos, admin):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    pos.verify("SITE-A", [line(code, P, 3)], settlement_id="open-1")
    resp = pos.verify("SITE-B", [line(code, P, 1)])
    r = resp.results[0]
    assert verdicts(resp) == ["DUPLICATE"]
    assert (r.evidence.first_site_id, r.evidence.first_settlement_id) == ("SITE-A", "open-1")
    assert r.evidence.units_used == 3 and r.evidence.attempts == 1
    assert r.units_remaining == 7
    assert pos.history(code).units_used == 3  # the other site took nothing


# ------------------------------------------------------------------ precedence

# The spec's order, written out here so that a change to verdicts.PRECEDENCE fails a test.
SPEC_ORDER = ("MALFORMED", "DUPLICATE_IN_REQUEST", "UNKNOWN", "BLOCKED", "DUPLICATE",
              "PRODUCT_MISMATCH", "EXPIRED", "QUANTITY_EXCEEDED")


def test_precedence_table_is_the_spec_order_and_the_readmes():
    # The behaviour tests below judge the server against SPEC_ORDER; here the table the Lua script
    # is built from, the README's verdict table (its row order is documented as the precedence)
    # and the API's enum must all agree with it.
    assert PRECEDENCE == SPEC_ORDER
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What it does", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.M)
    assert rows == ["OK", *SPEC_ORDER]
    assert set(pb.Verdict.keys()) - {"VERDICT_UNSPECIFIED"} == {"OK", *SPEC_ORDER}


ISSUED_CONDITIONS = ("DUPLICATE_IN_REQUEST", "BLOCKED", "DUPLICATE", "PRODUCT_MISMATCH", "EXPIRED",
                     "QUANTITY_EXCEEDED")


def _scenario(pos, admin, conditions: frozenset[str]):
    """Build an issued pack on which exactly `conditions` hold for the judged line (the last one),
    settle it at SITE-HERE and return that line's verdict."""
    code = cn20()
    past, future = iso(today_shanghai() - days(3)), far_future()
    load(admin, issuance(code, P, pack_units=10, expiry=future))
    if "DUPLICATE" in conditions:  # opened by another site: 3 of 10 used
        assert verdicts(pos.verify("SITE-OTHER", [line(code, P, 3)])) == ["OK"]
    # Reload the record (same product: an update) with the expiry and status the case needs.
    load(admin, issuance(code, P, pack_units=10,
                         expiry=past if "EXPIRED" in conditions else future,
                         status="LOCKED" if "BLOCKED" in conditions else "ACTIVE"))
    judged = line(code, Q if "PRODUCT_MISMATCH" in conditions else P,
                  11 if "QUANTITY_EXCEEDED" in conditions else 1)
    lines = [line(code, P, 0), judged] if "DUPLICATE_IN_REQUEST" in conditions else [judged]
    return verdicts(pos.verify("SITE-HERE", lines))[-1]


def test_precedence_over_every_combination_of_failing_checks(pos, admin):
    # 64 cases: every subset of the checks that can fail together on an issued pack. The verdict
    # must be the first of the spec's order among the failing checks, OK when none fails.
    wrong = []
    for n in range(len(ISSUED_CONDITIONS) + 1):
        for combo in itertools.combinations(ISSUED_CONDITIONS, n):
            conditions = frozenset(combo)
            expected = next((v for v in SPEC_ORDER if v in conditions), "OK")
            got = _scenario(pos, admin, conditions)
            if got != expected:
                wrong.append((sorted(conditions), expected, got))
    assert not wrong, wrong


@pytest.mark.parametrize("case, expected", [
    ("duplicate+product_mismatch", "DUPLICATE"),
    ("blocked+expired", "BLOCKED"),
    ("blocked+duplicate", "BLOCKED"),
    ("product_mismatch+expired", "PRODUCT_MISMATCH"),
    ("expired+quantity_exceeded", "EXPIRED"),
    ("duplicate+quantity_exceeded", "DUPLICATE"),
    ("duplicate_in_request+blocked", "DUPLICATE_IN_REQUEST"),
])
def test_precedence_named_cases(pos, admin, case, expected):
    conditions = frozenset(case.upper().split("+"))
    assert _scenario(pos, admin, conditions) == expected


def test_unknown_twice_is_duplicate_in_request(pos):
    code = cn20()
    resp = pos.verify("SITE-A", [line(code, P), line(code, P)])
    assert verdicts(resp) == ["UNKNOWN", "DUPLICATE_IN_REQUEST"]


def test_malformed_precedes_everything_and_is_never_a_duplicate(pos):
    resp = pos.verify("SITE-A", [line("81234", P), line("81234", P)])
    assert verdicts(resp) == ["MALFORMED", "MALFORMED"]


# ------------------------------------------------------------------ settlement policy

def test_record_accepted_records_the_ok_lines_only(pos, admin):
    good, used = cn20(), cn20()
    load(admin, issuance(good, P), issuance(used, P))
    pos.verify("SITE-A", [line(used, P)])
    resp = pos.verify("SITE-B", [line(good, P), line(used, P)])
    assert verdicts(resp) == ["OK", "DUPLICATE"] and resp.recorded
    assert resp.results[0].units_accepted == 1 and resp.results[0].reason == ""
    assert pos.history(good).units_used == 1


def test_all_or_nothing_records_nothing_when_a_line_is_flagged(pos, admin):
    good, used = cn20(), cn20()
    load(admin, issuance(good, P, pack_units=10), issuance(used, P))
    pos.verify("SITE-A", [line(used, P)])
    resp = pos.verify("SITE-B", [line(good, P, 4), line(used, P)], all_or_nothing=True)
    assert verdicts(resp) == ["OK", "DUPLICATE"] and not resp.recorded
    ok = resp.results[0]
    assert ok.units_accepted == 0 and ok.units_remaining == 10 and "not recorded" in ok.reason
    assert not ok.evidence.first_site_id  # no first dispense was made
    hist = pos.history(good)
    assert hist.units_used == 0 and not hist.events
    # The flagged line is still evidence: its attempt is logged under either policy.
    assert event_types(pos.history(used))[-1] == "DUPLICATE_ATTEMPT"
    # And the good pack is still a first dispense anywhere.
    assert verdicts(pos.verify("SITE-C", [line(good, P, 4)])) == ["OK"]


def test_all_or_nothing_with_every_line_ok_records_them(pos, admin):
    a, b = cn20(), cn20()
    load(admin, issuance(a, P), issuance(b, P))
    resp = pos.verify("SITE-A", [line(a, P), line(b, P)], all_or_nothing=True)
    assert verdicts(resp) == ["OK", "OK"] and resp.recorded
    assert pos.history(a).units_used == pos.history(b).units_used == 1


# ------------------------------------------------------------------ CheckCodes

def test_check_codes_marks_nothing(pos, admin, store):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    tail = AuditTail(store)
    for _ in range(2):
        assert verdicts(pos.check([line(code, P, 4)], site_id="SITE-A")) == ["OK"]
    hist = pos.history(code)
    assert hist.units_used == 0 and hist.events_total == 0 and not tail.new()

    pos.verify("SITE-A", [line(code, P, 4)], settlement_id="real-1")
    dup = pos.verify("SITE-B", [line(code, P, 1)])
    assert dup.results[0].evidence.attempts == 1
    tail.new()
    # A check from another site sees the duplicate and the stored count, without adding to it.
    checked = pos.check([line(code, P, 1)], site_id="SITE-C")
    r = checked.results[0]
    assert verdicts(checked) == ["DUPLICATE"]
    assert r.evidence.first_site_id == "SITE-A" and r.evidence.attempts == 1
    # The opening site may continue; an anonymous check treats every used pack as another site's.
    assert verdicts(pos.check([line(code, P, 6)], site_id="SITE-A")) == ["OK"]
    assert verdicts(pos.check([line(code, P, 1)])) == ["DUPLICATE"]
    hist = pos.history(code)
    assert hist.units_used == 4 and hist.first_dispense.attempts == 1 and hist.events_total == 2
    assert not tail.new()


def test_check_codes_judges_expiry_at_the_given_instant(pos, admin):
    code = cn20()
    d = today_shanghai() + days(30)
    load(admin, issuance(code, P, expiry=iso(d)))
    from tracecode.clients.pos import timestamp
    req = pb.CheckCodesRequest(site_id="SITE-A", at=timestamp(shanghai_instant(d + days(1))),
                               lines=[line(code, P)])
    assert [pb.Verdict.Name(r.verdict) for r in pos.stub.CheckCodes(req).results] == ["EXPIRED"]
    assert verdicts(pos.check([line(code, P)], site_id="SITE-A")) == ["OK"]


# ------------------------------------------------------------------ history and audit

def test_history_returns_the_record_and_every_event_in_order(pos, admin, store):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10, batch="B7", expiry=far_future(), manufacturer="M1"))
    tail = AuditTail(store)

    pos.verify("SITE-A", [line(code, P, 3)], settlement_id="h-1")
    (dispensed,) = tail.new()  # in the stream as soon as the call returned
    assert (dispensed["t"], dispensed["c"], dispensed["s"], dispensed["i"], dispensed["u"]) == \
        ("DISPENSED", code, "SITE-A", "h-1", "3")

    pos.verify("SITE-B", [line(code, P, 2)], settlement_id="h-2")
    (attempt,) = tail.new()
    assert (attempt["t"], attempt["x"], attempt["s"], attempt["u"]) == ("ATTEMPT", "DUPLICATE", "SITE-B", "2")

    pos.reverse("SITE-A", "h-1", reason="slip 42")
    (reversed_,) = tail.new()
    assert (reversed_["t"], reversed_["s"], reversed_["u"], reversed_["x"]) == ("REVERSED", "SITE-A", "3", "slip 42")

    admin.set_status(code, "LOCKED", reason="inquiry")
    (changed,) = tail.new()
    assert changed["t"] == "STATUS_CHANGED" and changed["c"] == code and "LOCKED" in changed["x"]

    hist = pos.history(code)
    assert hist.canonical_code == code
    rec = hist.record
    assert (rec.product_id, rec.batch, rec.pack_units, rec.manufacturer) == (P, "B7", 10, "M1")
    assert pb.CodeStatus.Name(rec.status) == "LOCKED"
    assert event_types(hist) == ["DISPENSED", "DUPLICATE_ATTEMPT", "REVERSED", "STATUS_CHANGED"]
    e = hist.events
    assert (e[0].site_id, e[0].settlement_id, e[0].units) == ("SITE-A", "h-1", 3)
    assert (e[1].site_id, e[1].settlement_id, e[1].units, e[1].detail) == ("SITE-B", "h-2", 2, "DUPLICATE")
    assert (e[2].site_id, e[2].settlement_id, e[2].units, e[2].detail) == ("SITE-A", "h-1", 3, "slip 42")
    assert "ACTIVE->LOCKED" in e[3].detail and "inquiry" in e[3].detail
    assert all(e[k].at.ToMilliseconds() <= e[k + 1].at.ToMilliseconds() for k in range(3))
    assert hist.events_total == 4 and hist.units_used == 0


def test_events_of_one_settlement_follow_its_line_order(pos, admin):
    # Line 0 is flagged (wrong product), line 1 is a split continuation that is OK: the history
    # must show the attempt first, as the lines were scanned.
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    resp = pos.verify("SITE-A", [line(code, Q, 5), line(code, P, 3)])
    assert verdicts(resp) == ["PRODUCT_MISMATCH", "OK"]
    hist = pos.history(code)
    assert [(pb.EventType.Name(e.type), e.line_index) for e in hist.events] == \
        [("DUPLICATE_ATTEMPT", 0), ("DISPENSED", 1)]


def test_unknown_attempts_go_to_the_audit_stream_only(pos, store):
    code = cn20()
    tail = AuditTail(store)
    pos.verify("SITE-A", [line(code, P)], settlement_id="u-1")
    (event,) = tail.new()
    assert (event["t"], event["x"], event["c"]) == ("ATTEMPT", "UNKNOWN", code)
    hist = pos.history(code)
    assert not hist.HasField("record") and hist.events_total == 0 and not hist.events


def test_replayed_settlement_logs_nothing_twice(pos, admin, store):
    code = cn20()
    load(admin, issuance(code, P))
    pos.verify("SITE-A", [line(code, P)])
    when = datetime.now(timezone.utc)
    first = pos.verify("SITE-B", [line(code, P)], settlement_id="again", settled_at=when)
    tail = AuditTail(store)
    again = pos.verify("SITE-B", [line(code, P)], settlement_id="again", settled_at=when)
    assert again.replayed and list(again.results) == list(first.results)
    assert not tail.new()
    assert pos.history(code).first_dispense.attempts == 1


def test_history_is_bounded_and_counts_every_event(admin, store, make_server):
    code = cn20()
    load(admin, issuance(code, P))
    tail = AuditTail(store)
    bounded = make_server(history_max=5)
    with PosClient(bounded) as pos:
        pos.verify("SITE-A", [line(code, P)], settlement_id="b-0")
        for k in range(1, 8):
            pos.verify(f"SITE-{k}", [line(code, P)], settlement_id=f"b-{k}")
        hist = pos.history(code)
    assert hist.events_total == 8
    assert len(hist.events) == 5
    # The first dispense and the newest four are kept, oldest first.
    assert [e.site_id for e in hist.events] == ["SITE-A"] + [f"SITE-{k}" for k in range(4, 8)]
    assert hist.events[0].type == pb.DISPENSED
    assert hist.first_dispense.attempts == 7
    # The audit stream is not cut down to the history limit.
    assert len(tail.new()) == 8


def test_first_dispense_survives_any_number_of_later_attempts(admin, store, make_server):
    code, other = cn20(), cn20()
    load(admin, issuance(code, P), issuance(other, P))
    bounded = make_server(history_max=4)
    with PosClient(bounded) as pos:
        # Flagged scans before the first dispense fill the list first: they may go, it may not.
        for k in range(6):
            pos.verify("SITE-X", [line(code, "OTHER-PRODUCT")], settlement_id=f"m-{k}")
        pos.verify("SITE-A", [line(code, P)], settlement_id="first")
        for k in range(999):
            pos.verify(f"SITE-{k % 7}", [line(code, P)], settlement_id=f"d-{k}")
        pos.reverse("SITE-A", "first")
        pos.verify("SITE-B", [line(code, P)], settlement_id="second")
        hist = pos.history(code)
    assert hist.events_total == 6 + 1 + 999 + 2
    assert len(hist.events) == 4
    kinds = [(e.type, e.settlement_id) for e in hist.events]
    assert kinds[0] == (pb.DISPENSED, "first")
    # The newest events follow it, in order: the last attempt, the return, the new dispense.
    assert kinds[1:] == [(pb.DUPLICATE_ATTEMPT, "d-998"), (pb.REVERSED, "first"), (pb.DISPENSED, "second")]


def test_history_of_a_malformed_scan_is_invalid_argument(pos):
    with pytest.raises(grpc.RpcError) as err:
        pos.history("81234")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
