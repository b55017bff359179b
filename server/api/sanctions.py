"""gRPC side of sanctions: the Admin API's SetSanction / LiftSanction / ListSanctions (a mixin of
api/servicer.AdminServicer), and proto <-> sanctions.Sanction / Notice, including the refusal's
FAILED_PRECONDITION with google.rpc.ErrorInfo.

May import: grpc, the generated stubs, the plain modules sanctions (types) and errors; it calls
the SanctionService it is given (sanction_service.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

from ..errors import InvalidRequest
from ..sanctions import SITE, Notice, Sanction

if TYPE_CHECKING:
    from ..sanction_service import SanctionService

ERROR_DOMAIN = "tracecode.v1"
_SUBJECT = {SITE: apb.SITE, "INSURED": apb.INSURED}


def _ts(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _iso(ms: int) -> str:
    return _ts(ms).ToJsonString() if ms else ""


def _ms(ts: timestamp_pb2.Timestamp, field: str) -> int:
    if not 0 <= ts.nanos <= 999_999_999:
        raise InvalidRequest([(f"{field}.nanos", f"{ts.nanos} outside 0..999999999")])
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def sanction_pb(s: Sanction, in_force: bool) -> apb.Sanction:
    m = apb.Sanction(sanction_id=s.sanction_id, kind=apb.SanctionKind.Value(s.kind), subject=_SUBJECT[s.subject],
                     subject_id=s.subject_id, valid_from=_ts(s.valid_from_ms), reason=s.reason,
                     reference=s.reference, actor=s.actor, created_at=_ts(s.created_at_ms),
                     lifted_by=s.lifted_by, lift_reason=s.lift_reason, in_force=in_force)
    if s.valid_until_ms:
        m.valid_until.CopyFrom(_ts(s.valid_until_ms))
    if s.lifted_at_ms:
        m.lifted_at.CopyFrom(_ts(s.lifted_at_ms))
    return m


def notice_pb(n: Notice) -> pb.SanctionNotice:
    m = pb.SanctionNotice(reason=n.reason, kind=n.kind, sanction_id=n.sanction_id, since=_ts(n.since_ms),
                          reference=n.reference)
    if n.until_ms:
        m.until.CopyFrom(_ts(n.until_ms))
    return m


def abort_sanctioned(context: grpc.ServicerContext, notices: list[Notice], text: str):
    """FAILED_PRECONDITION naming the sanction that refused the settlement (ErrorInfo reason and
    metadata: kind, sanction_id, since, until ('' = until lifted), reference)."""
    first = notices[0]
    info = error_details_pb2.ErrorInfo(reason=first.reason, domain=ERROR_DOMAIN, metadata={
        "kind": first.kind, "sanction_id": first.sanction_id, "since": _iso(first.since_ms),
        "until": _iso(first.until_ms), "reference": first.reference})
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=text)
    status.details.add().Pack(info)
    context.abort_with_status(rpc_status.to_status(status))


class SanctionAdmin:
    """Admin.SetSanction / LiftSanction / ListSanctions. Mixed into servicer.AdminServicer, which
    supplies `self.sanctions` (a SanctionService) and `self.authorize` (admin identities only),
    and wraps each method in its error mapper (servicer._guarded)."""

    sanctions: "SanctionService"
    authorize: Callable[[grpc.ServicerContext], str | None]

    def set_sanction(self, request: apb.SetSanctionRequest, context) -> apb.Sanction:
        caller = self.authorize(context) or "admin"
        kind = apb.SanctionKind.Name(request.kind) if request.kind in apb.SanctionKind.values() else None
        s = self.sanctions.set(
            request_id=request.request_id, kind=None if kind == "SANCTION_KIND_UNSPECIFIED" else kind,
            site_id=request.site_id, insured_id=request.insured_id, insured_pseudonym=request.insured_pseudonym,
            valid_from_ms=_ms(request.valid_from, "valid_from") if request.HasField("valid_from") else None,
            valid_until_ms=_ms(request.valid_until, "valid_until") if request.HasField("valid_until") else None,
            reason=request.reason, reference=request.reference, actor=request.actor or caller)
        return sanction_pb(s, self.sanctions.in_force(s))

    def lift_sanction(self, request: apb.LiftSanctionRequest, context) -> apb.Sanction:
        caller = self.authorize(context) or "admin"
        s = self.sanctions.lift(request.sanction_id, request.reason, request.actor or caller)
        return sanction_pb(s, self.sanctions.in_force(s))

    def list_sanctions(self, request: apb.ListSanctionsRequest, context) -> apb.ListSanctionsResponse:
        self.authorize(context)
        found = self.sanctions.list(site_id=request.site_id, insured_id=request.insured_id,
                                    insured_pseudonym=request.insured_pseudonym,
                                    include_history=request.include_history, reference=request.reference)
        return apb.ListSanctionsResponse(sanctions=[sanction_pb(s, self.sanctions.in_force(s)) for s in found])
