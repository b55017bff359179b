"""gRPC servicers: translate proto <-> verifier calls (api/convert.py) and domain errors ->
gRPC statuses (api/status.py). Thin on purpose: every rule lives in the verifier, every Redis
detail in the store."""
from __future__ import annotations

import time
from typing import Iterable

from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import admin_pb2_grpc
from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc

from tracecode.rules import insured

from .. import metrics, priority
from ..errors import InvalidRequest, LiveRuleRefused, PermissionDenied
from ..issuance import IssuanceService
from ..verifier import Verifier
from . import convert
from .convert import STATUS_ENUM, STATUS_NAME
from .sanctions import SanctionAdmin, notice_pb
from .status import guarded


class VerificationServicer(verification_pb2_grpc.VerificationServicer):
    def __init__(self, verifier: Verifier, identity=None):
        self.verifier = verifier
        # identity(context) -> the caller's site id, or None when the server runs without client
        # authentication (then the body's site id is taken as it is).
        self.identity = identity or (lambda context: None)

    def site_of(self, claimed: str, context) -> tuple[str, str | None]:
        """(the site the call acts for, the viewer): the viewer is the caller's own site id, or
        None for an admin identity or a server without authentication (they see every field)."""
        who = self.identity(context)
        if who is None:
            return claimed, None
        if claimed and claimed != who:
            raise PermissionDenied(f"authenticated as site {who!r}, request names site {claimed!r}")
        return who, who

    @priority.foreground
    @guarded
    def VerifyDispense(self, request: pb.VerifyDispenseRequest, context) -> pb.VerifyDispenseResponse:
        site, viewer = self.site_of(request.site_id, context)
        if not request.HasField("settled_at"):
            raise InvalidRequest([("settled_at", "required: the time of the sale")])
        start = time.perf_counter()
        if not insured.normalise(request.insured_id):  # only spaces is no id either
            metrics.WITHOUT_INSURED.inc()
        try:
            out = self.verifier.dispense(site, request.settlement_id, convert.ms(request.settled_at),
                                         convert.lines(request.lines), convert.all_or_nothing(request.policy),
                                         insured_id=request.insured_id)
        except LiveRuleRefused as exc:
            metrics.observe_live(exc.notice.get("m", ""), "refused")
            raise
        metrics.observe_settlement("pos", out, time.perf_counter() - start)
        if not out.replayed:
            for o in out.results:
                if o.receipt:
                    metrics.observe_receipt_notice(o.receipt)
        response = pb.VerifyDispenseResponse(
            settlement_id=request.settlement_id, site_id=site, recorded=out.recorded,
            replayed=out.replayed, results=[convert.line_fields(i, o, viewer) for i, o in enumerate(out.results)])
        if out.notices:
            for n in out.notices:
                metrics.observe_live(n.model, "unjudged" if n.action == "UNJUDGED" else "notice")
            response.notices.extend(convert.notice_pb(n) for n in out.notices)
        return response

    @priority.foreground
    @guarded
    def ReverseDispense(self, request: pb.ReverseDispenseRequest, context) -> pb.ReverseDispenseResponse:
        site, _ = self.site_of(request.site_id, context)
        lines = self.verifier.reverse(site, request.settlement_id, list(request.line_indexes), request.reason)
        metrics.REVERSALS.inc()
        return pb.ReverseDispenseResponse(settlement_id=request.settlement_id, lines=[
            pb.ReversedLine(line_index=r.line_index, canonical_code=r.canonical_code, units_returned=r.units_returned,
                            units_used=r.units_used, already_reversed=r.already_reversed) for r in lines])

    @priority.foreground
    @guarded
    def CheckCodes(self, request: pb.CheckCodesRequest, context) -> pb.CheckCodesResponse:
        site, viewer = self.site_of(request.site_id, context)
        at = convert.ms(request.at, "at") if request.HasField("at") else None
        out = self.verifier.check_with_sanctions(site, at, convert.lines(request.lines), request.insured_id)
        return pb.CheckCodesResponse(results=[convert.line_fields(i, o, viewer) for i, o in enumerate(out.results)],
                                     sanctions=[notice_pb(n) for n in out.sanctions])

    @priority.foreground
    @guarded
    def GetCodeHistory(self, request: pb.GetCodeHistoryRequest, context) -> pb.GetCodeHistoryResponse:
        # A pharmacy sees its own sales; the full history, pseudonyms included, is for admins.
        return convert.history_pb(*self.verifier.history(request.raw_code), viewer=self.identity(context))


class AdminServicer(SanctionAdmin, admin_pb2_grpc.AdminServicer):
    """Issuance and sanction management. In an authenticated deployment only admin identities
    reach it."""

    def __init__(self, issuance: IssuanceService, authorize=None, sanctions=None):
        self.issuance = issuance
        self.authorize = authorize or (lambda context: None)
        self.sanctions = sanctions

    SetSanction = guarded(SanctionAdmin.set_sanction)
    LiftSanction = guarded(SanctionAdmin.lift_sanction)
    ListSanctions = guarded(SanctionAdmin.list_sanctions)

    @guarded
    def UpsertIssuance(self, request_iterator: Iterable[apb.UpsertIssuanceRequest], context):
        self.authorize(context)
        summary = self.issuance.upsert_stream(convert.upsert_batch(r) for r in request_iterator)
        return convert.upsert_response(summary)

    @guarded
    def SetCodeStatus(self, request: apb.SetCodeStatusRequest, context):
        actor = self.authorize(context) or "admin"
        status = STATUS_NAME.get(request.status)
        if status is None:
            raise InvalidRequest([("status", "required: ACTIVE, RECALLED, LOCKED, STOLEN or DESTROYED")])
        code, previous = self.issuance.set_status(request.raw_code, status, request.reason, actor)
        return apb.SetCodeStatusResponse(canonical_code=code, previous=STATUS_ENUM[previous],
                                         status=STATUS_ENUM[status])

    @guarded
    def RecallBatch(self, request: apb.RecallBatchRequest, context):
        actor = self.authorize(context) or "admin"
        if request.status and request.status not in STATUS_NAME:
            raise InvalidRequest([("status", f"unknown value {request.status}: RECALLED, LOCKED, STOLEN or DESTROYED")])
        status = STATUS_NAME.get(request.status) or "RECALLED"
        changed, unchanged = self.issuance.recall_batch(request.product_id, request.batch, status,
                                                        request.reason, actor)
        return apb.RecallBatchResponse(codes_changed=changed, codes_unchanged=unchanged)

    @guarded
    def GetIssuance(self, request: apb.GetIssuanceRequest, context):
        self.authorize(context)
        code, record = self.issuance.get(request.raw_code)
        return convert.issuance_pb(code, record)
