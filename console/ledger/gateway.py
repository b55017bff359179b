"""Sanctions to tracecode: the console's only way to make a decision bite at the counter.

`deliver(req)` makes the call a SanctionRequest still owes the service (SetSanction with the
request's uuid as request_id, or LiftSanction) over gRPC with the project's client. An answer
clears the debt; a failure that may pass (service away, deadline, a server without the sanctions
API yet) keeps it owed, with the error and a next try time, and `retry_pending()` (the serve
process runs it every few seconds; `tracecode console retry` once) tries again. Nothing is ever
dropped: a permanent refusal (INVALID_ARGUMENT, ...) is kept as state REFUSED with the service's
message, on the lead's page.

SetSanction is idempotent on request_id, so a retry after a lost answer cannot impose twice.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import grpc
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import Entry, SanctionRequest

log = logging.getLogger("tracecode.console.gateway")

# gRPC status -> keep the call owed and retry (True) or record the refusal (False).
RETRY = {
    grpc.StatusCode.UNAVAILABLE: True,
    grpc.StatusCode.DEADLINE_EXCEEDED: True,
    grpc.StatusCode.RESOURCE_EXHAUSTED: True,
    grpc.StatusCode.CANCELLED: True,
    grpc.StatusCode.ABORTED: True,
    grpc.StatusCode.INTERNAL: True,
    grpc.StatusCode.UNKNOWN: True,
    # A service older than the sanctions API: the decision waits until the service has it.
    grpc.StatusCode.UNIMPLEMENTED: True,
    # Credentials wrong or expired: an operator fixes them; the decision must not be lost meanwhile.
    grpc.StatusCode.UNAUTHENTICATED: True,
    grpc.StatusCode.PERMISSION_DENIED: True,
    grpc.StatusCode.INVALID_ARGUMENT: False,
    grpc.StatusCode.ALREADY_EXISTS: False,
    grpc.StatusCode.FAILED_PRECONDITION: False,
    grpc.StatusCode.NOT_FOUND: False,
    grpc.StatusCode.OUT_OF_RANGE: False,
}
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class ServiceView:
    """What the service says about a lead's sanction right now (for the page)."""
    reachable: bool
    in_force: bool | None
    sanction_id: str = ""
    detail: str = ""


_client_lock = threading.Lock()
_client = None


def service_metadata() -> tuple[tuple[str, str], ...]:
    """The call metadata of the console's gRPC clients: its bearer token when one is configured."""
    if not settings.TRACECODE_TOKEN_FILE:
        return ()
    with open(settings.TRACECODE_TOKEN_FILE, encoding="ascii") as fh:
        return (("authorization", f"Bearer {fh.read().strip()}"),)


def channel_credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials | None:
    """TLS to the server when a CA or a client certificate is given (else plain: auth = none or
    token on a trusted network); ValueError for a certificate without its key."""
    if not (ca or cert):
        return None
    if bool(cert) != bool(key):
        raise ValueError("the TLS client certificate and its key go together")

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as fh:
            return fh.read()
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                        certificate_chain=read(cert))


def service_credentials() -> grpc.ChannelCredentials | None:
    """The channel credentials of the console's gRPC clients (TRACECODE_CONSOLE_TLS_*)."""
    return channel_credentials(settings.TRACECODE_TLS_CA, settings.TRACECODE_TLS_CERT, settings.TRACECODE_TLS_KEY)


def client():
    """One AdminClient per process (a gRPC channel reconnects by itself)."""
    global _client
    with _client_lock:
        if _client is None:
            from tracecode.clients.admin import AdminClient
            metadata = service_metadata()
            _client = AdminClient(settings.TRACECODE_SERVER, metadata=metadata, credentials=service_credentials(),
                                  timeout_s=settings.TRACECODE_RPC_TIMEOUT_S)
        return _client


def reset_client() -> None:
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None


def _set(req: SanctionRequest, insured_id: str):
    return client().set_sanction(
        req.kind, request_id=str(req.request_id),
        site_id=req.subject_id if req.subject_type == "SITE" else "",
        insured_id=insured_id,
        # The ledger keeps only pseudonyms: a card suspension names the person by it (the raw id,
        # when an approver typed it, is checked against it and sent instead, never kept).
        insured_pseudonym=req.subject_id if req.subject_type == "INSURED" and not insured_id else "",
        valid_from=req.valid_from, valid_until=req.valid_until,
        reason=req.reason, reference=req.lead.ref,
        actor=req.approved_by.username if req.approved_by else "")


def deliver(req: SanctionRequest, *, insured_id: str = "") -> SanctionRequest:
    """Make the call `req` owes now. `insured_id`: optionally the raw id of a card suspension's
    person, as the approver typed it (checked against the lead's pseudonym by the view), passed
    to the service and never stored; without it the person is named by the pseudonym."""
    with transaction.atomic():
        req = SanctionRequest.objects.select_for_update(of=("self",)).select_related("lead", "approved_by").get(pk=req.pk)
        if not req.call:
            return req
        call = req.call
        try:
            if call == "SET" or not req.sanction_id:
                answer = _set(req, insured_id)
                req.sanction_id = answer.sanction_id
            if call == "LIFT":
                answer = client().lift_sanction(req.sanction_id, reason=req.lift_reason,
                                                actor=req.lift_approved_by.username if req.lift_approved_by else "")
        except grpc.RpcError as exc:
            code = exc.code()
            message = f"{code.name}: {exc.details()}"
            req.attempts += 1
            req.last_error = message
            if RETRY.get(code, True):
                req.next_try_at = timezone.now() + timedelta(seconds=min(2 ** min(req.attempts, 6), MAX_BACKOFF_S))
                log.warning("sanction %s %s owed, will retry: %s", req.request_id, call, message)
            else:
                req.call, req.next_try_at = "", None
                if call == "SET":
                    req.state = SanctionRequest.REFUSED
                Entry.objects.create(lead=req.lead, actor="system:gateway", kind="SANCTION",
                                     field=f"sanction:{req.request_id}", after=SanctionRequest.REFUSED
                                     if call == "SET" else req.state, reason=f"服务拒绝：{message}")
            req.save()
            return req
        req.call, req.next_try_at, req.last_error = "", None, ""
        req.service_in_force, req.service_checked_at = answer.in_force, timezone.now()
        req.save()
        Entry.objects.create(lead=req.lead, actor="system:gateway", kind="SANCTION",
                             field=f"sanction:{req.request_id}", after=f"{call} {req.sanction_id}",
                             reason="已在结算服务生效" if answer.in_force else "服务已记录（当前未生效）")
        return req


def retry_pending(limit: int = 100) -> int:
    """Deliver the owed calls that are due; the number delivered (answered)."""
    due = (SanctionRequest.objects.exclude(call="").filter(next_try_at__lte=timezone.now())
           .order_by("next_try_at")[:limit])
    done = 0
    for req in list(due):
        if not deliver(req).call:
            done += 1
    return done


def service_view(req: SanctionRequest) -> ServiceView:
    """Ask the service whether the request's sanction binds now (ListSanctions by the lead's
    reference, matched by sanction id)."""
    if not req.sanction_id:
        return ServiceView(True, None, detail="尚未下发")
    try:
        found = client().list_sanctions(reference=req.lead.ref, include_history=True)
    except grpc.RpcError as exc:
        return ServiceView(False, req.service_in_force, req.sanction_id, f"{exc.code().name}: {exc.details()}")
    mine = next((s for s in found if s.sanction_id == req.sanction_id), None)
    if mine is None:
        return ServiceView(True, False, req.sanction_id, "服务端无此制裁")
    SanctionRequest.objects.filter(pk=req.pk).update(service_in_force=mine.in_force,
                                                     service_checked_at=timezone.now())
    return ServiceView(True, mine.in_force, mine.sanction_id)


class RetryLoop(threading.Thread):
    """The serve process's background retry of owed calls."""

    def __init__(self, interval_s: float):
        super().__init__(name="sanction-retry", daemon=True)
        self.interval_s, self.stopping = interval_s, threading.Event()

    def run(self):
        from django.db import close_old_connections
        while not self.stopping.wait(self.interval_s):
            try:
                retry_pending()
            except Exception:  # the loop must outlive a database hiccup; the next round retries
                log.exception("sanction retry round failed")
            finally:
                close_old_connections()
