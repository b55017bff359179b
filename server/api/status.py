"""Domain errors -> gRPC statuses, in one place: each error class names its status
(tracecode.server.errors); this module only looks it up and builds the google.rpc.Status, with
BadRequest field violations when the error carries them. Handlers read as the happy path.
"""
from __future__ import annotations

import logging

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import LiveRuleRefused, Sanctioned, SanctionViewStale, StoreUnavailable, status_of
from .sanctions import ERROR_DOMAIN, abort_sanctioned

log = logging.getLogger("tracecode.server")

# Fixed answers whose text must not carry the error's own (internal detail, retry advice).
_MESSAGES: dict[type, str] = {
    StoreUnavailable: "storage unavailable, retry with the same settlement id",
    SanctionViewStale: "sanctions not known to be current, retry with the same settlement id"}


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          violations: list[tuple[str, str]] | None = None):
    """Abort with a google.rpc.Status carrying BadRequest field violations when given."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if violations:
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])
        status.details.add().Pack(detail)
    context.abort_with_status(rpc_status.to_status(status))


def answer(context: grpc.ServicerContext, exc: BaseException, where: str):
    """Abort the call with the status `exc` stands for; INTERNAL (logged) for anything else."""
    name = status_of(exc)
    if name is None:
        if context.code() is not None:  # the handler's own abort: already answered
            raise exc
        # A bug or a misconfiguration (e.g. a Redis ACL without EVALSHA): INTERNAL, with the
        # traceback in our log and nothing of it in the answer (grpc's default would send
        # UNKNOWN with the exception's text to the pharmacy).
        log.error("internal error in %s", where, exc_info=exc)
        abort(context, grpc.StatusCode.INTERNAL, "internal error; the server logged it for its operators")
    if isinstance(exc, StoreUnavailable):
        log.warning("redis unavailable: %s", exc)
    if isinstance(exc, SanctionViewStale):
        log.warning("%s", exc)
    if isinstance(exc, Sanctioned) and exc.notices:
        abort_sanctioned(context, exc.notices, exc.text or str(exc))  # FAILED_PRECONDITION + ErrorInfo
    if isinstance(exc, LiveRuleRefused):
        abort_live_refused(context, exc)
    abort(context, getattr(grpc.StatusCode, name or "INTERNAL"), _MESSAGES.get(type(exc), str(exc)),
          getattr(exc, "violations", None))


def abort_live_refused(context: grpc.ServicerContext, exc: LiveRuleRefused):
    """FAILED_PRECONDITION naming the live rule that refused the settlement: ErrorInfo reason =
    the model (STOCKPILING, RESALE_SOURCE), metadata its version and figures; nothing was marked."""
    n = exc.notice
    info = error_details_pb2.ErrorInfo(reason=str(n.get("m", "")), domain=ERROR_DOMAIN, metadata={
        "model_version": str(n.get("v", "")), "packs": str(n.get("k", "")), "sites": str(n.get("s", "")),
        "product_id": str(n.get("g", "")), "window_hours": f"{float(n.get('w', 0)):g}"})
    status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message=exc.text or str(exc))
    status.details.add().Pack(info)
    context.abort_with_status(rpc_status.to_status(status))


def guarded(method):
    """Map whatever a unary handler raises to its status (answer)."""
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error gets its status, unknown ones INTERNAL
            answer(context, exc, method.__name__)
    handler.__name__ = method.__name__
    return handler
