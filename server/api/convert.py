"""Protobuf <-> the plain objects of the rules modules: every conversion between the wire and the
verifier, issuance and store types lives here, so the rules modules never see a message.
"""
from __future__ import annotations

from google.protobuf import timestamp_pb2

from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

from ..errors import InvalidRequest
from ..issuance import IssuanceInput, UpsertBatch, UpsertSummary
from ..store.types import CodeHistory, IssuanceRecord
from tracecode.rules.verdicts import EVENTS, STATUSES, VERDICTS
from ..verifier import RECEIPT_TEXT, Line, LineOutcome

# Names (verdicts.py) <-> the API's enum numbers.
VERDICT_ENUM = {name: pb.Verdict.Value(name) for name in VERDICTS}
STATUS_ENUM = {name: pb.CodeStatus.Value(name) for name in STATUSES}
STATUS_NAME = {v: k for k, v in STATUS_ENUM.items()}
# The scripts' event names -> EventType (ATTEMPT is the API's DUPLICATE_ATTEMPT).
EVENT_ENUM = dict(zip(EVENTS, (pb.DISPENSED, pb.DUPLICATE_ATTEMPT, pb.REVERSED, pb.STATUS_CHANGED)))

# SettlementPolicy -> all_or_nothing. A value not in this table (a newer or a broken client) is
# INVALID_ARGUMENT: guessing a policy could record what the POS meant to hold back.
_POLICY: dict[int, bool] = {pb.SETTLEMENT_POLICY_UNSPECIFIED: False, pb.RECORD_ACCEPTED: False, pb.ALL_OR_NOTHING: True}


def all_or_nothing(policy: int) -> bool:
    try:
        return _POLICY[policy]
    except KeyError:
        raise InvalidRequest([("policy", f"unknown value {policy}: RECORD_ACCEPTED or ALL_OR_NOTHING")]) from None


def ms(ts: timestamp_pb2.Timestamp, field: str = "settled_at") -> int:
    """A Timestamp as ms since the epoch; an invalid one (nanos outside 0..999,999,999, which
    protobuf's own rules forbid) is INVALID_ARGUMENT naming the field."""
    if not 0 <= ts.nanos <= 999_999_999:
        raise InvalidRequest([(f"{field}.nanos", f"{ts.nanos} outside 0..999999999")])
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def ts(millis: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=millis // 1000, nanos=(millis % 1000) * 1_000_000)


def lines(request_lines) -> list[Line]:
    return [Line(ln.raw_code, ln.product_id, ln.units) for ln in request_lines]


def notice_pb(n) -> pb.RuleNotice:
    """A live rule's notice (verifier.LiveNotice) as a RuleNotice."""
    return pb.RuleNotice(model=n.model, model_version=n.version, state="UNJUDGED" if n.action == "UNJUDGED" else "NOTICE",
                         packs=n.packs, sites=n.sites, product_id=n.product_id, window_hours=n.window_hours,
                         text=n.text)


def line_result(i: int, o: LineOutcome) -> pb.LineResult:
    return pb.LineResult(**line_fields(i, o))


def line_fields(i: int, o: LineOutcome, viewer: str | None = None) -> dict:
    """A LineResult as the plain dict its constructor takes. viewer: the calling pharmacy's site
    id, or None for an admin identity (or a server without authentication): a pharmacy sees
    another site's first dispense as its site and time, never its settlement id (as history_pb).

    A response built from these dicts (results=[dict, ...]) gets the same bytes as one built from LineResult messages, in about
    half the time: each message would be built and then copied into the repeated field.
    One constructor call from plain dicts (nested messages included) is itself about half the
    time of setting submessage fields one by one, on a path taken once per line."""
    fields = dict(line_index=i, verdict=VERDICT_ENUM[o.verdict], canonical_code=o.canonical_code,
                  reason=o.reason, reason_zh=o.reason_zh, units_accepted=o.units_accepted,
                  units_remaining=o.units_remaining, issued_product_id=o.issued_product_id)
    if o.first_site_id:
        t = o.first_settled_at_ms
        own = viewer is None or viewer == o.first_site_id
        fields["evidence"] = dict(first_site_id=o.first_site_id, first_settlement_id=o.first_settlement_id if own else "",
                                  first_settled_at=dict(seconds=t // 1000, nanos=(t % 1000) * 1_000_000),
                                  attempts=o.attempts, units_used=o.units_used)
    if o.status:
        fields["code_status"] = STATUS_ENUM.get(o.status, 0)
    if o.receipt:
        fields["receipt"] = pb.ReceiptNotice.Value(o.receipt)
        fields["receipt_text"] = RECEIPT_TEXT[o.receipt]
    return fields


def issuance_pb(code: str, record: IssuanceRecord) -> pb.IssuanceRecord:
    e = str(record.expiry or "")
    return pb.IssuanceRecord(
        canonical_code=code, product_id=record.product_id, gtin=record.gtin, batch=record.batch,
        expiry=f"{e[:4]}-{e[4:6]}-{e[6:]}" if len(e) == 8 else "", pack_units=record.pack_units,
        manufacturer=record.manufacturer, status=STATUS_ENUM.get(record.status, 0))


# Events of one site's sale (another pharmacy's are not shown to a pharmacy); the pack's own
# events (status changes, issuance) are shown to every caller.
_SITE_EVENTS = frozenset({"DISPENSED", "ATTEMPT", "REVERSED"})


def history_pb(code: str, h: CodeHistory, viewer: str | None = None) -> pb.GetCodeHistoryResponse:
    """viewer: the calling pharmacy's site id, or None for an admin identity (or a server without
    authentication). A pharmacy sees its own sales' events and, of the first dispense, the site
    and time (its settlement id only when it is its own); pseudonyms only an admin (docs/security.md)."""
    resp = pb.GetCodeHistoryResponse(canonical_code=code, units_used=h.units_used, events_total=h.events_total)
    if h.record:
        resp.record.CopyFrom(issuance_pb(code, h.record))
    if h.first_site_id:
        ev = resp.first_dispense
        ev.first_site_id, ev.first_settlement_id = h.first_site_id, h.first_settlement_id
        ev.first_settled_at.CopyFrom(ts(h.first_settled_at_ms))
        ev.attempts, ev.units_used = h.attempts, h.units_used
        if viewer is None:
            resp.first_insured_id = ev.first_insured_id = h.first_insured_id
        elif h.first_site_id != viewer:
            ev.first_settlement_id = ""
    for e in h.events:
        if viewer is not None and e.site_id != viewer and e.type in _SITE_EVENTS:
            continue
        resp.events.add(type=EVENT_ENUM.get(e.type, 0), at=ts(e.at_ms), site_id=e.site_id,
                        settlement_id=e.settlement_id, line_index=e.line_index, units=e.units, detail=e.detail,
                        insured_id=e.insured_id if viewer is None else "")
    return resp


def issuance_input(rec: apb.IssuanceInput) -> IssuanceInput:
    # An enum number the API does not know stays visible as its number: a record error then.
    status = "" if not rec.status else STATUS_NAME.get(rec.status, str(rec.status))
    return IssuanceInput(rec.code, rec.product_id, rec.gtin, rec.batch, rec.expiry, rec.pack_units,
                         rec.manufacturer, status)


def upsert_batch(req: apb.UpsertIssuanceRequest) -> UpsertBatch:
    return UpsertBatch([issuance_input(r) for r in req.records], req.replace, req.source, req.first_line)


def upsert_response(s: UpsertSummary) -> apb.UpsertIssuanceResponse:
    return apb.UpsertIssuanceResponse(
        received=s.received, created=s.created, updated=s.updated, unchanged=s.unchanged,
        conflicts=s.conflicts, rejected=s.rejected,
        errors=[apb.RecordError(source=e.source, line=e.line, code=e.code, reason=e.reason) for e in s.errors])
