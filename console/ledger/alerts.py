"""A pharmacy's own alerts (issue 28): what its counter raised, its answers, the inspector's
acceptance, and the counts of unanswered alerts by age.

- Kept from the audit feed (stream.py calls `record`): flagged attempts (AUDIT_ATTEMPT with a
  verdict other than OK), refusals (AUDIT_REFUSED, a sanction in force), notices (AUDIT_NOTICE)
  and packs refused as stock at the receiving check (AUDIT_RECEIVE_FLAGGED: a resold pack offered
  by a supplier, 回流药 entering the chain; the pharmacy answers what it did with the delivery).
  One `Alert` per event identity, so a redelivery or a replay
  adds nothing. A DUPLICATE attempt is also evidence of the buying site's LIVE lead (intake.add_live);
  its alert points at that lead.
- Answered by the site that raised it, never another (`for_site` filters every read and write by
  the caller's site: another site's alert is "not found", not "forbidden", so ids reveal nothing),
  once, with a cause of rules.ANSWER_CAUSES and a note. Sending the same answer again is a no-op
  (a retry); another answer to an answered alert is refused (`Conflict`): corrections go through
  the inspector, as every change to the ledger does. The answer is an Entry on the lead (who:
  site:<id>), so the lead's history shows it and the lead page lists it.
- Accepted by the inspector working the lead (`accept`): a technical cause concludes the lead
  查证不属实 with the matching lead cause (workflow.transition: its rules, its history), in one
  transaction with the acceptance.

May import: Django, the generated stubs (the feed's event type) and the ledger app.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta, timezone as dt_timezone

from django.db import transaction
from django.utils import timezone

from tracecode.rules.text import text_problem
from tracecode.v1 import audit_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

from . import workflow
from .models import Alert, Entry, Evidence, Lead
from .rules import ALERT_AGES_H, ANSWER_CAUSES, Status

# The feed's event types a pharmacy answers, by the ledger's kind. A notice type joins by name
# when the feed has one (the notices at settlement of the models issue).
KIND_OF = {apb.AUDIT_ATTEMPT: "ATTEMPT", apb.AUDIT_REFUSED: "REFUSED", apb.AUDIT_NOTICE: "NOTICE",
           apb.AUDIT_RECEIVE_FLAGGED: "RECEIVE"}
# Kinds whose event carries a verdict (the counter's, or the receiving check's).
WITH_VERDICT = ("ATTEMPT", "RECEIVE")

# What each flagged verdict means to the pharmacist.
VERDICT_TEXT = {
    "DUPLICATE": "重复结算：该药盒此前已在医保结算过",
    "DUPLICATE_IN_REQUEST": "同一结算中重复扫描同一药盒",
    "UNKNOWN": "追溯码无赋码记录",
    "BLOCKED": "药盒已被召回、锁定、挂失或销毁",
    "PRODUCT_MISMATCH": "追溯码对应的药品与结算药品不符（串换）",
    "EXPIRED": "药品已过有效期",
    "QUANTITY_EXCEEDED": "拆零数量超过整盒剩余数量",
}
NOTE_MAX = 2000


class NotFound(Exception):
    """No such alert of this site (another site's alert is not found either)."""


class Invalid(ValueError):
    """The answer is not acceptable: `field` and a Chinese message."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Conflict(Exception):
    """The alert was answered already, otherwise."""


def _key(kind: str, e) -> str:
    return f"ALERT|{kind}|{e.site_id}|{e.settlement_id}|{e.line_index}|{e.canonical_code}"[:300]


def record(e: apb.AuditEvent) -> Alert | None:
    """The alert an audit event is, kept once (None: not an alert). Call after intake.add_live
    for a DUPLICATE, so its lead is found through the evidence line."""
    kind = KIND_OF.get(e.type)
    if kind is None or not e.site_id or (kind == "ATTEMPT" and e.verdict == pb.OK):
        return None
    verdict = pb.Verdict.Name(e.verdict) if kind in WITH_VERDICT and e.verdict in pb.Verdict.values() else ""
    lead = None
    if kind == "ATTEMPT" and verdict == "DUPLICATE":
        from .intake import LiveDuplicate
        ev_key = LiveDuplicate(e.site_id, e.settlement_id, e.line_index, e.canonical_code,
                               timezone.now()).key
        found = Evidence.objects.filter(key=ev_key).select_related("lead").first()
        lead = found.lead if found else None
    raised = e.at.ToDatetime(tzinfo=dt_timezone.utc) if (e.at.seconds or e.at.nanos) else timezone.now()
    alert, created = Alert.objects.get_or_create(key=_key(kind, e), defaults=dict(
        site_id=e.site_id, kind=kind, verdict=verdict, detail=e.detail[:2000], canonical_code=e.canonical_code[:128],
        settlement_id=e.settlement_id[:128], line_index=e.line_index, raised_at=raised, lead=lead))
    if not created and alert.lead_id is None and lead is not None:
        Alert.objects.filter(pk=alert.pk, lead__isnull=True).update(lead=lead)
    return alert


def for_site(site_id: str):
    """Every read and write of the pharmacy API goes through this: the site's own alerts only."""
    return Alert.objects.filter(site_id=site_id)


def message(a: Alert) -> str:
    if a.kind == "ATTEMPT":
        return VERDICT_TEXT.get(a.verdict, a.verdict or a.detail)
    if a.kind == "REFUSED":
        return f"结算被拒绝：{a.detail}"
    if a.kind == "RECEIVE":
        return f"入库核验未通过：{VERDICT_TEXT.get(a.verdict, a.verdict or a.detail)}"
    return a.detail


def state(a: Alert) -> str:
    return "ACCEPTED" if a.accepted_at else "ANSWERED" if a.answered_at else "OPEN"


STATE_LABELS = {"OPEN": "待答复", "ANSWERED": "已答复", "ACCEPTED": "已采纳"}


def as_json(a: Alert) -> dict:
    """What the pharmacy sees of its alert: its own counter's facts and its answer. No lead
    number, no other site, no person."""
    return {
        "id": str(a.public_id), "kind": a.kind, "kind_label": a.kind_label, "verdict": a.verdict,
        "message": message(a), "canonical_code": a.canonical_code, "settlement_id": a.settlement_id,
        "line": a.line_index + 1 if a.line_index >= 0 else None,
        "raised_at": a.raised_at.isoformat(), "state": state(a), "state_label": STATE_LABELS[state(a)],
        "answer": None if not a.answered_at else {
            "cause": a.cause, "cause_label": a.cause_label, "note": a.note, "answered_at": a.answered_at.isoformat()},
    }


def list_alerts(site_id: str, which: str = "all", limit: int = 200) -> list[Alert]:
    qs = for_site(site_id)
    if which == "open":
        qs = qs.filter(answered_at__isnull=True)
    elif which == "answered":
        qs = qs.filter(answered_at__isnull=False)
    return list(qs.order_by("-raised_at", "-id")[:limit])


def answer(site_id: str, alert_id: str, cause: str, note: str) -> Alert:
    """The site's answer to its own alert (idempotent on the same answer)."""
    if cause not in ANSWER_CAUSES:
        raise Invalid("cause", "原因须为以下之一：" + "，".join(f"{k}（{v.label}）" for k, v in ANSWER_CAUSES.items()))
    note = (note or "").strip()
    problem = text_problem(note, NOTE_MAX, "note", required=cause == "OTHER")
    if problem:
        raise Invalid("note", "选择「其他」时须填写说明" if problem.startswith("required") else f"说明不可接受：{problem}")
    with transaction.atomic():
        try:
            a = for_site(site_id).select_for_update().get(public_id=alert_id)
        except (Alert.DoesNotExist, ValueError):  # ValueError: not a uuid
            raise NotFound(alert_id) from None
        if a.answered_at:
            if a.cause == cause and a.note == note:
                return a  # the same answer again: a retry
            raise Conflict(f"该预警已于 {timezone.localtime(a.answered_at):%Y-%m-%d %H:%M} 答复，不能修改；如需更正请联系核查员")
        a.cause, a.note, a.answered_at, a.answered_by = cause, note, timezone.now(), f"site:{site_id}"
        a.save(update_fields=["cause", "note", "answered_at", "answered_by"])
        if a.lead_id:
            Entry.objects.create(lead_id=a.lead_id, actor=a.answered_by, kind="ANSWER", field=f"alert:{a.public_id}",
                                 after=cause, reason=f"药店答复（{a.kind_label} {a.canonical_code}）："
                                                     f"{ANSWER_CAUSES[cause].label}" + (f"；{note}" if note else ""))
        return a


def accept(alert_pk: int, actor, reason: str) -> Lead:
    """The inspector accepts the pharmacy's technical answer: the lead becomes 查证不属实 with
    the answer's cause (workflow.transition checks who may and from which status)."""
    with transaction.atomic():
        # Not select_related: PostgreSQL locks no nullable side of an outer join.
        a = Alert.objects.select_for_update().get(pk=alert_pk)
        if a.lead is None or not a.answered_at:
            raise workflow.RuleError("该预警没有可采纳的答复")
        lead_cause = ANSWER_CAUSES[a.cause].lead_cause if a.cause in ANSWER_CAUSES else None
        if lead_cause is None:
            raise workflow.RuleError("答复原因为「其他」，不能直接作为结论；请核查后自行作出结论")
        if a.accepted_at:
            return a.lead
        why = (reason or "").strip() or f"采纳药店答复：{a.cause_label}"
        lead = workflow.transition(a.lead, Status.UNFOUNDED, actor, why, cause=lead_cause.value)
        a.accepted_by, a.accepted_at = actor.username, timezone.now()
        a.save(update_fields=["accepted_by", "accepted_at"])
        Entry.objects.create(lead=lead, actor=actor.username, kind="ANSWER", field=f"alert:{a.public_id}",
                             after="ACCEPTED", reason=why)
        return lead


@dataclass(frozen=True)
class Unanswered:
    total: int
    older: dict[str, int]  # label of rules.ALERT_AGES_H -> unanswered alerts older than it


def unanswered(now=None) -> Unanswered:
    now = now or timezone.now()
    open_ = Alert.objects.filter(answered_at__isnull=True)
    return Unanswered(open_.count(), {label: open_.filter(raised_at__lt=now - timedelta(hours=h)).count()
                                      for label, h in ALERT_AGES_H.items()})


class Collector:
    """tracecode_console_pharmacy_alerts_unanswered{older_than} from the ledger at each scrape."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        u = unanswered()
        g = GaugeMetricFamily("tracecode_console_pharmacy_alerts_unanswered",
                              "Alerts raised at pharmacies' counters and not answered by them, by age "
                              "(older_than 0h: all of them)", labels=["older_than"])
        g.add_metric(["0h"], u.total)
        for label, n in u.older.items():
            g.add_metric([label], n)
        yield g
        c = CounterMetricFamily("tracecode_console_pharmacy_alerts", "Alerts kept for pharmacies, by state",
                                labels=["state"])
        total = Alert.objects.count()
        answered = Alert.objects.filter(answered_at__isnull=False).count()
        accepted = Alert.objects.filter(accepted_at__isnull=False).count()
        c.add_metric(["raised"], total)
        c.add_metric(["answered"], answered)
        c.add_metric(["accepted"], accepted)
        yield c
