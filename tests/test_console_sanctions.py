"""Sanctions from the ledger through the gateway to a real tracecode server: a call the service
could not take stays owed and is retried until it lands (never lost, never doubled), a card
suspension needs the person's id typed at approval (checked against the lead's pseudonym, never
stored), and the console's own serve process retries owed calls by itself."""
from __future__ import annotations

import time

import grpc
import pytest
from console_support import ConsoleProcess, http, make_user, unique
from factories import cn20, issuance, load

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.store import free_port


def _confirmed_site_lead(sup, ins, site):
    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
    from tracecode.console.ledger.rules import Source, Status
    lead = arrive(LeadFacts(Source.MODEL, "RESALE_BUYER", "SITE", site), f"T:{site}", [], ImportReport())
    workflow.assign(lead, ins, sup)
    return workflow.transition(lead, Status.CONFIRMED, ins, "属实", "FRAUD_RESALE")


def _refused(target, site) -> bool:
    admin = AdminClient(target)
    code = cn20()
    load(admin, issuance(code, "P1"))
    admin.close()
    with PosClient(target, deadline_s=5, retries=0) as pos:
        try:
            pos.verify(site, [line(code, "P1")])
            return False
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            return True


def test_owed_call_is_retried_until_the_service_takes_it(console_env, console_redis):
    from django.conf import settings

    from tracecode.console.ledger import gateway, workflow
    from tracecode.console.ledger.models import SanctionRequest
    from tracecode.server.app import Server, make_store
    from tracecode.server.config import Config

    port = free_port()
    settings.TRACECODE_SERVER = f"127.0.0.1:{port}"  # the service is down
    gateway.reset_client()
    sup, sup2, ins = make_user("supervisor"), make_user("supervisor"), make_user("inspector")
    site = unique("S")
    lead = _confirmed_site_lead(sup, ins, site)
    req = workflow.propose_sanction(lead, workflow.SanctionProposal("TERMINATE", site, "解除协议"), ins)
    r = http(sup).post(f"/sanctions/{req.request_id}/approve", follow=True)
    assert "已列入待下发队列" in r.content.decode()
    req.refresh_from_db()
    assert (req.state, req.call, req.attempts) == ("APPROVED", "SET", 1) and "UNAVAILABLE" in req.last_error
    assert "待下发" in http(sup2).get(f"/leads/{lead.ref}/").content.decode()

    # Still down: a retry round keeps it owed, with the backoff moving on.
    SanctionRequest.objects.filter(pk=req.pk).update(next_try_at=None)
    req.refresh_from_db()
    SanctionRequest.objects.filter(pk=req.pk).update(next_try_at=req.proposed_at)
    assert gateway.retry_pending() == 0
    req.refresh_from_db()
    assert req.call == "SET" and req.attempts == 2 and req.next_try_at > req.proposed_at

    # The service comes up on that address: the next round delivers it, once.
    cfg = Config(listen=f"127.0.0.1:{port}", metrics_port=0, key_prefix=unique("c"), threads=4, grace_s=0.5,
                 pseudonym_key_file=console_env.key_file)
    store = make_store(cfg, console_redis.url)
    srv = Server(cfg, store).start()
    try:
        # (the client's channel may still be in its reconnect backoff for a moment: rounds go on)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            SanctionRequest.objects.filter(pk=req.pk).update(next_try_at=req.proposed_at)
            if gateway.retry_pending() == 1:
                break
            time.sleep(0.3)
        req.refresh_from_db()
        assert req.call == "" and req.sanction_id and req.service_in_force is True
        assert _refused(settings.TRACECODE_SERVER, site)
        # A repeated delivery (say the answer was lost) is the same sanction: request_id idempotency.
        admin = AdminClient(settings.TRACECODE_SERVER)
        again = admin.set_sanction("TERMINATE_AGREEMENT", request_id=str(req.request_id), site_id=site,
                                   reason=req.reason, reference=lead.ref, actor=sup.username)
        assert again.sanction_id == req.sanction_id
        assert len(admin.list_sanctions(site_id=site)) == 1
        admin.close()
        # Lifting through two people; the lift lands and the site settles again.
        workflow.propose_lift(req, ins, "整改完毕")
        with pytest.raises(workflow.Forbidden):
            workflow.approve_lift(req, ins)
        req = gateway.deliver(workflow.approve_lift(req, sup2))
        assert req.call == "" and req.state == "LIFTED" and req.service_in_force is False
        assert not _refused(settings.TRACECODE_SERVER, site)
    finally:
        srv.stop(0)
        store.close()
        gateway.reset_client()


def test_card_suspension_names_the_person_by_pseudonym_a_typed_id_must_match(console_env, service):
    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive, pseudonymizer
    from tracecode.console.ledger.rules import Source, Status
    raw = unique("3301") + "X"
    p = pseudonymizer().pseudonym(raw)
    sup, ins = make_user("supervisor"), make_user("inspector")
    lead = arrive(LeadFacts(Source.MODEL, "RESALE_SOURCE", "INSURED", p), f"T:{p}", [], ImportReport())
    workflow.assign(lead, ins, sup)
    lead = workflow.transition(lead, Status.CONFIRMED, ins, "倒卖", "FRAUD_RESALE")
    req = workflow.propose_sanction(lead, workflow.SanctionProposal("P_SUSPEND_CARD", "", "倒卖医保药品"), ins)
    assert req.subject_id == p and req.subject_type == "INSURED"
    c = http(sup)
    # Another person's (valid) id does not match the lead's pseudonym; a mistyped id is named by its rule.
    r = c.post(f"/sanctions/{req.request_id}/approve", {"insured_id": "11010519491231002X"}, follow=True)
    assert "与线索对象的化名核对" in r.content.decode()
    r = c.post(f"/sanctions/{req.request_id}/approve", {"insured_id": "110101199001011234"}, follow=True)
    body = r.content.decode()
    assert "证件号无效" in body and "check character" in body and "110101199001011234" not in body
    # An id the form itself refuses (too long) is an error too, not silently an approval by pseudonym.
    r = c.post(f"/sanctions/{req.request_id}/approve", {"insured_id": "1" * 200}, follow=True)
    assert "参保人证件号" in r.content.decode() and "1" * 200 not in r.content.decode()
    req.refresh_from_db()
    assert req.state == "PROPOSED"
    req.refresh_from_db()
    assert req.state == "PROPOSED"
    r = c.post(f"/sanctions/{req.request_id}/approve", {}, follow=True)  # no raw id: by pseudonym
    req.refresh_from_db()
    assert req.state == "APPROVED" and req.call == "" and req.service_in_force is True, req.last_error
    # The person is refused at any site.
    admin = AdminClient(service.target)
    code = cn20()
    load(admin, issuance(code, "P1"))
    assert admin.list_sanctions(insured_pseudonym=p)[0].sanction_id == req.sanction_id
    admin.close()
    with PosClient(service.target, deadline_s=5, retries=0) as pos:
        with pytest.raises(grpc.RpcError) as exc:
            pos.verify(unique("ANY"), [line(code, "P1")], insured_id=raw)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert raw not in console_env.pg.dump() and raw.lower() not in console_env.pg.dump()


def test_the_serve_process_retries_owed_calls_by_itself(console_env, service):
    from tracecode.console.ledger import workflow
    sup, ins = make_user("supervisor"), make_user("inspector")
    site = unique("S")
    lead = _confirmed_site_lead(sup, ins, site)
    req = workflow.approve_sanction(workflow.propose_sanction(
        lead, workflow.SanctionProposal("BLACKLIST", site, "黑名单"), ins), sup)
    assert req.call == "SET"  # owed (as if the service had been away when it was approved)
    proc = ConsoleProcess(console_env, service.target).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            req.refresh_from_db()
            if not req.call:
                break
            time.sleep(0.2)
        assert req.call == "" and req.service_in_force is True
    finally:
        proc.stop()
    assert _refused(service.target, site)
