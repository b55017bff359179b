"""gRPC servicers: translate proto <-> verifier calls and domain errors -> gRPC statuses. Thin on
purpose: every rule lives in the verifier, every Redis detail in the store."""
from __future__ import annotations

import logging
import time
from typing import Iterable

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import admin_pb2_grpc
from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc

from . import metrics, priority
from .issuance import IssuanceService
from .errors import (BadLineIndex, InvalidRequest, NotFound, PermissionDenied, ReturnWindowClosed,
                     Sanctioned, SanctionViewStale, SettlementConflict, StoreUnavailable)
from .sanction_api import SanctionAdmin, abort_sanctioned, notice_pb
from .verdicts import EVENT_ENUM, STATUS_ENUM, STATUS_NAME, VERDICT_ENUM
from .verifier import Line, LineOutcome, Verifier

log = logging.getLogger("tracecode.server")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
           violations: list[tuple[str, str]] | None = None):
    """Abort with a google.rpc.Status carrying BadRequest field violations when given."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if violations:
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])
        status.details.add().Pack(detail)
    context.abort_with_status(rpc_status.to_status(status))


def _guarded(method):
    """Map domain errors to statuses in one place, so handlers read as the happy path."""
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except InvalidRequest as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.violations)
        except SettlementConflict as exc:
            _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except NotFound as exc:
            _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except ReturnWindowClosed as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"return window closed: {exc}")
        except BadLineIndex as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc),
                   [("line_indexes", str(exc))])
        except PermissionDenied as exc:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except Sanctioned as exc:
            abort_sanctioned(context, exc.notices, getattr(exc, "text", str(exc)))
        except SanctionViewStale as exc:
            log.warning("%s", exc)
            _abort(context, grpc.StatusCode.UNAVAILABLE, "sanctions not known to be current, retry with the same settlement id")
        except StoreUnavailable as exc:
            log.warning("redis unavailable: %s", exc)
            _abort(context, grpc.StatusCode.UNAVAILABLE, "storage unavailable, retry with the same settlement id")
        except Exception:
            if context.code() is not None:  # the handler's own abort: already answered
                raise
            # A bug or a misconfiguration (e.g. a Redis ACL without EVALSHA): INTERNAL, with the
            # traceback in our log and nothing of it in the answer (grpc's default would send
            # UNKNOWN with the exception's text to the pharmacy).
            log.exception("internal error in %s", method.__name__)
            _abort(context, grpc.StatusCode.INTERNAL, "internal error; the server logged it for its operators")
    handler.__name__ = method.__name__
    return handler


def _ms(ts: timestamp_pb2.Timestamp, field: str = "settled_at") -> int:
    """A Timestamp as ms since the epoch; an invalid one (nanos outside 0..999,999,999, which
    protobuf's own rules forbid) is INVALID_ARGUMENT naming the field."""
    if not 0 <= ts.nanos <= 999_999_999:
        raise InvalidRequest([(f"{field}.nanos", f"{ts.nanos} outside 0..999999999")])
    return ts.seconds * 1000 + ts.nanos // 1_000_000


# SettlementPolicy -> all_or_nothing. A value not in this table (a newer or a broken client) is
# INVALID_ARGUMENT: guessing a policy could record what the POS meant to hold back.
_POLICY = {pb.SETTLEMENT_POLICY_UNSPECIFIED: False, pb.RECORD_ACCEPTED: False, pb.ALL_OR_NOTHING: True}


def _all_or_nothing(policy: int) -> bool:
    try:
        return _POLICY[policy]
    except KeyError:
        raise InvalidRequest([("policy", f"unknown value {policy}: RECORD_ACCEPTED or ALL_OR_NOTHING")]) from None


def _ts(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _lines(request_lines) -> list[Line]:
    return [Line(ln.raw_code, ln.product_id, ln.units) for ln in request_lines]


def _result(i: int, o: LineOutcome) -> pb.LineResult:
    # One constructor call from plain dicts (nested messages included): about half the time of
    # setting submessage fields one by one, on a path taken once per line (the same bytes).
    fields = dict(line_index=i, verdict=VERDICT_ENUM[o.verdict], canonical_code=o.canonical_code,
                  reason=o.reason, units_accepted=o.units_accepted,
                  units_remaining=o.units_remaining, issued_product_id=o.issued_product_id)
    if o.first_site_id:
        ms = o.first_settled_at_ms
        fields["evidence"] = dict(first_site_id=o.first_site_id, first_settlement_id=o.first_settlement_id,
                                  first_settled_at=dict(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000),
                                  attempts=o.attempts, units_used=o.units_used)
    if o.status:
        fields["code_status"] = STATUS_ENUM.get(o.status, 0)
    return pb.LineResult(**fields)


class VerificationServicer(verification_pb2_grpc.VerificationServicer):
    def __init__(self, verifier: Verifier, identity=None):
        self.verifier = verifier
        # identity(context) -> the caller's site id, or None when the server runs without client
        # authentication (then the body's site id is taken as it is).
        self.identity = identity or (lambda context: None)

    def _site(self, claimed: str, context) -> str:
        who = self.identity(context)
        if who is None:
            return claimed
        if claimed and claimed != who:
            raise PermissionDenied(f"authenticated as site {who!r}, request names site {claimed!r}")
        return who

    @priority.foreground
    @_guarded
    def VerifyDispense(self, request: pb.VerifyDispenseRequest, context) -> pb.VerifyDispenseResponse:
        site = self._site(request.site_id, context)
        if not request.HasField("settled_at"):
            raise InvalidRequest([("settled_at", "required: the time of the sale")])
        start = time.perf_counter()
        if not request.insured_id:
            metrics.WITHOUT_INSURED.inc()
        out = self.verifier.dispense(site, request.settlement_id, _ms(request.settled_at),
                                     _lines(request.lines), _all_or_nothing(request.policy),
                                     insured_id=request.insured_id)
        metrics.observe_settlement("pos", out, time.perf_counter() - start)
        return pb.VerifyDispenseResponse(
            settlement_id=request.settlement_id, site_id=site, recorded=out.recorded,
            replayed=out.replayed, results=[_result(i, o) for i, o in enumerate(out.results)])

    @priority.foreground
    @_guarded
    def ReverseDispense(self, request: pb.ReverseDispenseRequest, context) -> pb.ReverseDispenseResponse:
        site = self._site(request.site_id, context)
        lines = self.verifier.reverse(site, request.settlement_id, list(request.line_indexes), request.reason)
        metrics.REVERSALS.inc()
        return pb.ReverseDispenseResponse(settlement_id=request.settlement_id, lines=[
            pb.ReversedLine(line_index=i, canonical_code=code, units_returned=returned, units_used=used,
                            already_reversed=already) for i, code, returned, used, already in lines])

    @priority.foreground
    @_guarded
    def CheckCodes(self, request: pb.CheckCodesRequest, context) -> pb.CheckCodesResponse:
        site = self._site(request.site_id, context)
        at = _ms(request.at, "at") if request.HasField("at") else None
        out = self.verifier.check_with_sanctions(site, at, _lines(request.lines), request.insured_id)
        return pb.CheckCodesResponse(results=[_result(i, o) for i, o in enumerate(out.results)],
                                     sanctions=[notice_pb(n) for n in out.sanctions])

    @priority.foreground
    @_guarded
    def GetCodeHistory(self, request: pb.GetCodeHistoryRequest, context) -> pb.GetCodeHistoryResponse:
        code = self.verifier.canonical(request.raw_code)
        record, state, events = self.verifier.store.code_history(code)
        # A pharmacy sees its own sales and who dispensed first (site, time); everything else,
        # pseudonyms included, is for admin identities (docs/security.md, "Code history").
        me = self.identity(context)
        resp = pb.GetCodeHistoryResponse(canonical_code=code, units_used=int(state.get("u", 0)),
                                         events_total=int(state.get("ev", 0)))
        if record:
            resp.record.CopyFrom(issuance_pb(code, record))
        if state.get("fs"):
            ev = resp.first_dispense
            ev.first_site_id, ev.first_settlement_id = state["fs"], state.get("fi", "")
            ev.first_settled_at.CopyFrom(_ts(int(state.get("fa", 0))))
            ev.attempts, ev.units_used = int(state.get("at", 0)), int(state.get("u", 0))
            if me is None:
                resp.first_insured_id = ev.first_insured_id = state.get("fp", "")
            elif state["fs"] != me:
                ev.first_settlement_id = ""
        for e in events:
            if me is not None and e["s"] != me and e["t"] in _SITE_EVENTS:
                continue
            resp.events.add(type=EVENT_ENUM.get(e["t"], 0), at=_ts(int(e["a"])), site_id=e["s"],
                            settlement_id=e["i"], line_index=int(e["l"]), units=int(e["u"]),
                            detail=str(e["x"]), insured_id=e.get("p", "") if me is None else "")
        return resp


# Events of one site's sale (another pharmacy's are not shown to a pharmacy); the pack's own
# events (status changes, issuance) are shown to every caller.
_SITE_EVENTS = frozenset({"DISPENSED", "ATTEMPT", "REVERSED"})


def issuance_pb(code: str, record: dict) -> pb.IssuanceRecord:
    e = str(record.get("expiry") or "0")
    return pb.IssuanceRecord(
        canonical_code=code, product_id=record["product_id"], gtin=record.get("gtin") or "",
        batch=record.get("batch") or "", expiry=f"{e[:4]}-{e[4:6]}-{e[6:]}" if len(e) == 8 else "",
        pack_units=int(record.get("pack_units") or 1), manufacturer=record.get("manufacturer") or "",
        status=STATUS_ENUM.get(record.get("status") or "ACTIVE", 0))


class AdminServicer(SanctionAdmin, admin_pb2_grpc.AdminServicer):
    """Issuance and sanction management. In an authenticated deployment only admin identities
    reach it."""

    def __init__(self, issuance: IssuanceService, authorize=None, sanctions=None):
        self.issuance = issuance
        self.authorize = authorize or (lambda context: None)
        self.sanctions = sanctions

    SetSanction = _guarded(SanctionAdmin._set_sanction)
    LiftSanction = _guarded(SanctionAdmin._lift_sanction)
    ListSanctions = _guarded(SanctionAdmin._list_sanctions)

    @_guarded
    def UpsertIssuance(self, request_iterator: Iterable[apb.UpsertIssuanceRequest], context):
        self.authorize(context)
        return self.issuance.upsert_stream(request_iterator)

    @_guarded
    def SetCodeStatus(self, request: apb.SetCodeStatusRequest, context):
        actor = self.authorize(context) or "admin"
        status = STATUS_NAME.get(request.status)
        if status is None:
            raise InvalidRequest([("status", "required: ACTIVE, RECALLED, LOCKED, STOLEN or DESTROYED")])
        code, previous = self.issuance.set_status(request.raw_code, status, request.reason, actor)
        return apb.SetCodeStatusResponse(canonical_code=code, previous=STATUS_ENUM[previous],
                                         status=STATUS_ENUM[status])

    @_guarded
    def RecallBatch(self, request: apb.RecallBatchRequest, context):
        actor = self.authorize(context) or "admin"
        if request.status and request.status not in STATUS_NAME:
            raise InvalidRequest([("status", f"unknown value {request.status}: RECALLED, LOCKED, STOLEN or DESTROYED")])
        status = STATUS_NAME.get(request.status) or "RECALLED"
        changed, unchanged = self.issuance.recall_batch(request.product_id, request.batch, status,
                                                        request.reason, actor)
        return apb.RecallBatchResponse(codes_changed=changed, codes_unchanged=unchanged)

    @_guarded
    def GetIssuance(self, request: apb.GetIssuanceRequest, context):
        self.authorize(context)
        code, record = self.issuance.get(request.raw_code)
        return issuance_pb(code, record)
