"""Every change to a lead, in one place: the role check (rules.ROLES via roles.has), the status
rules (rules.TRANSITIONS), and the history entry. Views call these; nothing else writes a lead.

Errors: `Forbidden` (the role or the person may not do it: HTTP 403) and `RuleError` (the
ledger's rules say no: shown to the user, nothing changed).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from django.db import transaction
from django.utils import timezone

from .models import Action, Entry, Inspection, Lead, SanctionRequest, Site
from .roles import has
from .rules import (ACTIONS, CAUSES, HANDED_DOWN, SANCTION_ACTIONS, SANCTION_MAY_END, TRANSITIONS,
                    Cause, Party, Perm, Source, Status, STATUS_LABELS)


class Forbidden(Exception):
    """The user's role (or who they are) does not allow this action."""


class RuleError(ValueError):
    """The ledger's rules refuse the change; the message says why, in the UI's language."""


def _require(user, perm: Perm) -> None:
    if not has(user, perm):
        raise Forbidden(f"{user.username} 无权限：{perm.value}")


def visible_leads(user):
    """The leads a user may see: all with VIEW_ALL, else only those assigned to them."""
    qs = Lead.objects.all()
    if has(user, Perm.VIEW_ALL):
        return qs
    if has(user, Perm.WORK):
        return qs.filter(assignee=user)
    return qs.none()


def can_see(user, lead: Lead) -> bool:
    return has(user, Perm.VIEW_ALL) or (has(user, Perm.WORK) and lead.assignee_id == user.id)


def _own(user, lead: Lead) -> None:
    """Work on a lead: the assigned inspector, or a supervisor (who sees and reviews all)."""
    if lead.assignee_id == user.id:
        return
    if has(user, Perm.VIEW_ALL) and has(user, Perm.REVIEW):
        return
    raise Forbidden(f"线索 {lead.ref} 未分派给 {user.username}")


def _entry(lead, actor, kind, *, field="", before="", after="", reason=""):
    Entry.objects.create(lead=lead, actor=actor if isinstance(actor, str) else actor.username, kind=kind,
                         field=field, before=str(before), after=str(after), reason=reason)


def _locked(lead: Lead) -> Lead:
    return Lead.objects.select_for_update().get(pk=lead.pk)


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise RuleError("请填写理由")
    return reason


@transaction.atomic
def assign(lead: Lead, assignee, actor, reason: str = "") -> Lead:
    _require(actor, Perm.ASSIGN)
    lead = _locked(lead)
    if not lead.is_open:
        raise RuleError(f"线索 {lead.ref} 已办结，不能分派")
    if not has(assignee, Perm.WORK):
        raise RuleError(f"{assignee.username} 不是核查人员")
    before = lead.assignee.username if lead.assignee else ""
    lead.assignee = assignee
    _entry(lead, actor, "ASSIGN", field="assignee", before=before, after=assignee.username, reason=reason)
    if lead.status == Status.NEW.value:
        lead.status = Status.IN_PROGRESS.value
        _entry(lead, actor, "STATUS", field="status", before=Status.NEW.value,
               after=Status.IN_PROGRESS.value, reason=reason or "分派核查")
    lead.save(update_fields=["assignee", "status"])
    return lead


def allowed_transitions(user, lead: Lead):
    """The transitions the user may make on the lead now (for the page's buttons)."""
    out = []
    for t in TRANSITIONS[Status(lead.status)]:
        if not has(user, t.perm):
            continue
        if t.own_only and lead.assignee_id != user.id and not has(user, Perm.REVIEW):
            continue
        out.append(t)
    return out


@transaction.atomic
def transition(lead: Lead, to: Status, actor, reason: str, cause: str = "") -> Lead:
    lead = _locked(lead)
    frm = Status(lead.status)
    rule = next((t for t in TRANSITIONS[frm] if t.to == to), None)
    if rule is None:
        raise RuleError(f"不能从「{STATUS_LABELS[frm]}」变为「{STATUS_LABELS[to]}」")
    _require(actor, rule.perm)
    if rule.own_only:
        _own(actor, lead)
    reason = _reason(reason)
    if rule.needs_cause:
        try:
            c = CAUSES[Cause(cause)]
        except ValueError:
            raise RuleError("请选择核查结论的原因") from None
        if c.fraud not in rule.needs_cause:
            raise RuleError(f"原因「{c.label}」不能作为「{STATUS_LABELS[to]}」的结论"
                            + ("（技术原因不计入查证属实）" if c.technical else ""))
        _entry(lead, actor, "CAUSE", field="cause", before=lead.cause, after=cause, reason=reason)
        lead.cause = cause
    if to == Status.IN_PROGRESS:  # sent back: the finding is void, a new one will be made
        _entry(lead, actor, "CAUSE", field="cause", before=lead.cause, after="", reason=reason)
        lead.cause = ""
    if to == Status.CLOSED:
        if Source(lead.source) in HANDED_DOWN and not lead.handling_report.strip():
            raise RuleError("移交线索办结前须提交处理报告")
        lead.closed_at = timezone.now()
    _entry(lead, actor, "STATUS", field="status", before=frm.value, after=to.value, reason=reason)
    lead.status = to.value
    lead.save(update_fields=["status", "cause", "closed_at"])
    return lead


@transaction.atomic
def set_handling_report(lead: Lead, text: str, actor) -> Lead:
    lead = _locked(lead)
    _require(actor, Perm.WORK)
    _own(actor, lead)
    if not lead.is_open:
        raise RuleError("已办结的线索不能修改处理报告")
    text = (text or "").strip()
    if not text:
        raise RuleError("处理报告不能为空")
    _entry(lead, actor, "REPORT", field="handling_report", before=lead.handling_report, after=text)
    lead.handling_report = text
    lead.save(update_fields=["handling_report"])
    return lead


@transaction.atomic
def add_note(lead: Lead, text: str, actor) -> None:
    """A note, or a correction of an earlier entry (entries themselves are never edited)."""
    _require(actor, Perm.WORK)
    _own(actor, lead)
    _entry(lead, actor, "NOTE", reason=_reason(text))


def _site_kind_region(site_id: str, lead: Lead) -> tuple[str, str]:
    site = Site.objects.filter(site_id=site_id).first()
    return (site.kind if site else ""), (site.region if site and site.region else lead.region)


def lead_sites(lead: Lead) -> list[str]:
    """The sites a lead names (its subject, or a ring's members)."""
    if lead.subject_kind == "SITE":
        return [lead.subject_id]
    if lead.subject_kind == "RING":
        return lead.subject_id.split("+")
    return []


@dataclass(frozen=True)
class ActionInput:
    code: str
    subject_id: str              # a site of the lead, or the lead's insured pseudonym
    decided_on: date
    amount_wan: Decimal | None = None
    monthly_turnover_wan: Decimal | None = None
    violation_wan: Decimal | None = None
    confiscated_wan: Decimal | None = None
    note: str = ""


def _action_subject(lead: Lead, party: Party, subject_id: str) -> str:
    if party == Party.INSTITUTION:
        sites = lead_sites(lead)
        subject_id = subject_id or (sites[0] if len(sites) == 1 else "")
        if subject_id not in sites:
            raise RuleError(f"处理对象须为本线索的机构之一：{', '.join(sites) or '（本线索无机构）'}")
        return subject_id
    if lead.subject_kind != "INSURED":
        raise RuleError("参保人员处理结果只能记在以参保人为对象的线索上")
    return lead.subject_id


@transaction.atomic
def record_action(lead: Lead, data: ActionInput, actor, *, sanction: SanctionRequest | None = None) -> Action:
    lead = _locked(lead)
    _require(actor, Perm.RECORD_ACTION)
    _own(actor, lead)
    at = ACTIONS.get(data.code)
    if at is None:
        raise RuleError(f"未知的处理结果 {data.code}")
    if at.sanction and sanction is None:
        raise RuleError(f"「{at.label}」须经提议和审批（制裁），不能直接登记")
    if Status(lead.status) not in (Status.CONFIRMED, Status.CLOSED):
        raise RuleError("只有查证属实的线索才能登记处理结果")
    if at.money and data.amount_wan is None:
        raise RuleError(f"「{at.label}」须填写金额（万元）")
    subject = _action_subject(lead, at.party, data.subject_id)
    kind, region = _site_kind_region(subject, lead) if at.party == Party.INSTITUTION else ("", lead.region)
    act = Action.objects.create(
        lead=lead, code=at.code, party=at.party.value, subject_id=subject, site_kind=kind, region=region,
        decided_on=data.decided_on, amount_wan=data.amount_wan,
        monthly_turnover_wan=data.monthly_turnover_wan if at.reduced_loss else None,
        violation_wan=data.violation_wan if at.reduced_loss else None,
        confiscated_wan=data.confiscated_wan if at.reduced_loss else None,
        note=data.note, actor=actor.username, sanction=sanction)
    _entry(lead, actor, "ACTION", field="action", after=f"{at.label} {subject}"
           + (f" {data.amount_wan}万元" if data.amount_wan is not None else ""), reason=data.note)
    return act


@transaction.atomic
def add_inspection(lead: Lead, site_id: str, on_site: bool, inspected_on: date, actor) -> Inspection:
    lead = _locked(lead)
    _require(actor, Perm.WORK)
    _own(actor, lead)
    if site_id not in lead_sites(lead):
        raise RuleError("检查对象须为本线索的机构")
    _, region = _site_kind_region(site_id, lead)
    ins = Inspection.objects.create(lead=lead, site_id=site_id, region=region, on_site=on_site,
                                    inspected_on=inspected_on, actor=actor.username)
    _entry(lead, actor, "INSPECTION", after=f"{site_id} {'现场检查' if on_site else '非现场检查'} {inspected_on}")
    return ins


# --- sanctions: two people ---------------------------------------------------------------


@dataclass(frozen=True)
class SanctionProposal:
    action_code: str       # a rules.SANCTION_ACTIONS code
    subject_id: str        # a site of the lead (site sanctions); ignored for card suspension
    reason: str
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    monthly_turnover_wan: Decimal | None = None
    violation_wan: Decimal | None = None
    confiscated_wan: Decimal | None = None


@transaction.atomic
def propose_sanction(lead: Lead, p: SanctionProposal, actor) -> SanctionRequest:
    lead = _locked(lead)
    _require(actor, Perm.PROPOSE_SANCTION)
    _own(actor, lead)
    if Status(lead.status) != Status.CONFIRMED:
        raise RuleError("只能对查证属实的线索提议制裁")
    at = SANCTION_ACTIONS.get(p.action_code)
    if at is None:
        raise RuleError(f"「{p.action_code}」不是可在结算时生效的处理")
    subject = _action_subject(lead, at.party, p.subject_id)
    if p.valid_until is not None:
        if at.sanction not in SANCTION_MAY_END:
            raise RuleError(f"「{at.label}」直至解除，不能设定截止时间")
        if p.valid_until <= (p.valid_from or timezone.now()):
            raise RuleError("截止时间须晚于开始时间")
    req = SanctionRequest.objects.create(
        lead=lead, action_code=at.code, kind=at.sanction,
        subject_type="SITE" if at.party == Party.INSTITUTION else "INSURED", subject_id=subject,
        valid_from=p.valid_from, valid_until=p.valid_until, reason=_reason(p.reason), proposed_by=actor,
        monthly_turnover_wan=p.monthly_turnover_wan if at.reduced_loss else None,
        violation_wan=p.violation_wan if at.reduced_loss else None,
        confiscated_wan=p.confiscated_wan if at.reduced_loss else None)
    return req


def _other_approver(req_user_id, actor, what: str) -> None:
    _require(actor, Perm.APPROVE_SANCTION)
    if req_user_id == actor.id:
        raise Forbidden(f"不能审批本人的{what}（须由另一名审核人批准）")


@transaction.atomic
def approve_sanction(req: SanctionRequest, actor) -> SanctionRequest:
    """The second person's yes: the action is recorded and the SetSanction call becomes owed
    (gateway.deliver makes it now or, if the service is away, later)."""
    # One transaction, the row read under its lock (PostgreSQL: FOR UPDATE; SQLite: BEGIN
    # IMMEDIATE, settings.SQLITE_OPTIONS): a second approver waits, then finds it done.
    req = SanctionRequest.objects.select_for_update().get(pk=req.pk)
    _other_approver(req.proposed_by_id, actor, "制裁提议")
    if req.state == SanctionRequest.APPROVED and req.approved_by_id is not None:
        raise RuleError(f"该制裁已由 {req.approved_by.username} 批准（already approved），无需再批")
    if req.state != SanctionRequest.PROPOSED:
        raise RuleError(f"该提议的状态为「{req.state_label}」，不能审批")
    if Status(req.lead.status) not in (Status.CONFIRMED, Status.CLOSED):
        raise RuleError("线索已不是查证属实状态")
    req.state, req.approved_by, req.approved_at = SanctionRequest.APPROVED, actor, timezone.now()
    req.call, req.next_try_at = "SET", timezone.now()
    req.save()
    _entry(req.lead, actor, "SANCTION", field=f"sanction:{req.request_id}", before=SanctionRequest.PROPOSED,
           after=SanctionRequest.APPROVED, reason=f"批准 {req.action_label} {req.subject_id}")
    # The decision is an action of the lead (周报表 counts it), recorded by the approver.
    record_action(req.lead, ActionInput(
        code=req.action_code, subject_id=req.subject_id, decided_on=timezone.localdate(),
        monthly_turnover_wan=req.monthly_turnover_wan, violation_wan=req.violation_wan,
        confiscated_wan=req.confiscated_wan, note=req.reason), actor, sanction=req)
    return req


@transaction.atomic
def reject_sanction(req: SanctionRequest, actor, reason: str) -> SanctionRequest:
    req = SanctionRequest.objects.select_for_update().get(pk=req.pk)
    _other_approver(req.proposed_by_id, actor, "制裁提议")
    if req.state != SanctionRequest.PROPOSED:
        raise RuleError(f"该提议的状态为「{req.state_label}」，不能驳回")
    req.state = SanctionRequest.REJECTED
    req.save(update_fields=["state"])
    _entry(req.lead, actor, "SANCTION", field=f"sanction:{req.request_id}", before=SanctionRequest.PROPOSED,
           after=SanctionRequest.REJECTED, reason=_reason(reason))
    return req


@transaction.atomic
def propose_lift(req: SanctionRequest, actor, reason: str) -> SanctionRequest:
    req = SanctionRequest.objects.select_for_update().get(pk=req.pk)
    _require(actor, Perm.PROPOSE_SANCTION)
    _own(actor, req.lead)
    if req.state != SanctionRequest.APPROVED:
        raise RuleError(f"该制裁的状态为「{req.state_label}」，不能提议解除")
    req.state, req.lift_proposed_by, req.lift_reason = SanctionRequest.LIFT_PROPOSED, actor, _reason(reason)
    req.save(update_fields=["state", "lift_proposed_by", "lift_reason"])
    _entry(req.lead, actor, "SANCTION", field=f"sanction:{req.request_id}", before=SanctionRequest.APPROVED,
           after=SanctionRequest.LIFT_PROPOSED, reason=req.lift_reason)
    return req


@transaction.atomic
def approve_lift(req: SanctionRequest, actor) -> SanctionRequest:
    req = SanctionRequest.objects.select_for_update().get(pk=req.pk)
    _other_approver(req.lift_proposed_by_id, actor, "解除提议")
    if req.state != SanctionRequest.LIFT_PROPOSED:
        raise RuleError(f"该制裁的状态为「{req.state_label}」，不能批准解除")
    req.state, req.lift_approved_by = SanctionRequest.LIFTED, actor
    # LIFT after any SET still owed: the gateway first repeats the SET (same request_id, so the
    # service answers with the sanction it may already have made) to learn its id.
    req.call, req.next_try_at, req.attempts = "LIFT", timezone.now(), 0
    req.save()
    _entry(req.lead, actor, "SANCTION", field=f"sanction:{req.request_id}", before=SanctionRequest.LIFT_PROPOSED,
           after=SanctionRequest.LIFTED, reason=f"批准解除 {req.action_label} {req.subject_id}")
    return req


@transaction.atomic
def reject_lift(req: SanctionRequest, actor, reason: str) -> SanctionRequest:
    req = SanctionRequest.objects.select_for_update().get(pk=req.pk)
    _other_approver(req.lift_proposed_by_id, actor, "解除提议")
    if req.state != SanctionRequest.LIFT_PROPOSED:
        raise RuleError(f"该制裁的状态为「{req.state_label}」，不能驳回解除")
    req.state = SanctionRequest.APPROVED
    req.save(update_fields=["state"])
    _entry(req.lead, actor, "SANCTION", field=f"sanction:{req.request_id}", before=SanctionRequest.LIFT_PROPOSED,
           after=SanctionRequest.APPROVED, reason=_reason(reason))
    return req
