"""The ledger's tables.

A lead's current status and assignee are columns for filtering; the truth of what happened is
`Entry`, which is append-only: entries are never updated or deleted (the model refuses, and on
PostgreSQL and SQLite triggers refuse too, migrations/0002 and 0003). Corrections are new entries.
"""
from __future__ import annotations

import decimal
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.utils.functional import cached_property
from django.db.models import Q

from .rules import (ACTIONS, DEFAULT_MODEL_STATUS, MODEL_STATUS_LABELS, OPEN_STATUSES, PILOT, RISK_LABELS,
                    SOURCE_LABELS, STATUS_LABELS, Perm, Source, Status)


def _choices(labels):
    return [(k.value, v) for k, v in labels.items()]


class AppendOnly(Exception):
    """An attempt to edit or delete a history row."""


class MoneyField(models.DecimalField):
    """A DecimalField whose stored values always read back. SQLite keeps a decimal as a REAL
    with 15 significant digits, and Django quantizes it with a context of max_digits digits: the
    column's own maximum (99999999999999.99 reads back as 1.00000000000000E+14) or a value stored
    before imports were checked (1e20) raised InvalidOperation on every page that listed the row.
    Here the context is wide and does not trap, so such a value reads as a number (or NaN), never
    an exception. Imports keep values within max_digits (intake.py); this is only the reading side.
    The migration state knows it as a plain DecimalField (deconstruct): the schema is the same."""

    @cached_property
    def context(self):
        return decimal.Context(prec=max(self.max_digits or 0, 400), traps=[decimal.DivisionByZero, decimal.Overflow])

    def deconstruct(self):
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.DecimalField", args, kwargs


# Typed as Any like Django's own fields are here (no stubs), so a column holds what it holds (a Decimal).
Money: Any = MoneyField


def _label(labels, enum, code):
    try:
        return labels[enum(code)]
    except (ValueError, KeyError):
        return code


class Site(models.Model):
    """The site registry (files.md): kind and region for the report's columns and rows."""
    site_id = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, blank=True, default="")  # PHARMACY | INSTITUTION | ''
    region = models.CharField(max_length=32, blank=True, default="", db_index=True)
    name = models.CharField(max_length=200, blank=True, default="")


class Batch(models.Model):
    """A handed-down batch (国家局/省局移交, or a set of complaints): source, number, date."""
    source = models.CharField(max_length=16, choices=_choices(SOURCE_LABELS))
    number = models.CharField(max_length=64)
    received_on = models.DateField()
    imported_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT,
                                    related_name="+")
    imported_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "number"], name="batch_once")]

    def __str__(self):
        return f"{SOURCE_LABELS[Source(self.source)]} {self.number}（{self.received_on:%m.%d}）"


class Lead(models.Model):
    """One lead (疑点线索) on one subject. At most one open lead per (model, subject): new hits on
    a subject that has one are added to it as evidence (see intake.py)."""
    ref = models.CharField(max_length=40, unique=True)  # the ledger's own number, e.g. L00000042
    # What "the same subject" means for the one-open-lead rule: model|kind|subject, and for a
    # handed-down lead source|batch|kind|subject (each batch is answered on its own).
    lock_key = models.CharField(max_length=600, db_index=True)
    source = models.CharField(max_length=16, choices=_choices(SOURCE_LABELS), db_index=True)
    batch = models.ForeignKey(Batch, null=True, blank=True, on_delete=models.PROTECT, related_name="leads")
    model = models.CharField(max_length=40, db_index=True)
    model_version = models.CharField(max_length=16, blank=True, default="")
    # The model version's status when the lead was opened (rules.MODEL_STATUS_LABELS): a pilot's
    # leads are worked like any other but counted apart. Like model_version it stays as opened.
    model_status = models.CharField(max_length=12, default=DEFAULT_MODEL_STATUS, db_index=True)
    subject_kind = models.CharField(max_length=8)  # SITE | INSURED | RING
    subject_id = models.CharField(max_length=400, db_index=True)  # site id, pseudonym, ring
    region = models.CharField(max_length=32, blank=True, default="", db_index=True)
    window_start = models.DateTimeField(null=True)
    window_end = models.DateTimeField(null=True)
    score = models.FloatField(null=True)
    risk = models.CharField(max_length=8, blank=True, default="")
    packs = models.IntegerField(default=0)
    lines = models.IntegerField(default=0)
    amount = Money(max_digits=16, decimal_places=2, null=True)
    summary = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=_choices(STATUS_LABELS), default=Status.NEW.value,
                              db_index=True)
    assignee = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
                                 related_name="assigned_leads")
    cause = models.CharField(max_length=24, blank=True, default="")  # rules.Cause of the finding
    # Earlier leads on the same subject when this one was opened (屡次出现).
    repeat_count = models.IntegerField(default=0, db_index=True)
    handling_report = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True)

    class Meta:
        permissions = [(p.value, p.value) for p in Perm]
        constraints = [models.UniqueConstraint(
            fields=["lock_key"],
            condition=Q(status__in=sorted(s.value for s in OPEN_STATUSES)), name="one_open_lead_per_subject")]

    # Labels of stored codes: a code the rules do not know (a row written by hand, an older
    # version) is shown as it is rather than breaking every page that lists the lead.
    @property
    def status_label(self):
        return _label(STATUS_LABELS, Status, self.status)

    @property
    def risk_label(self):
        return RISK_LABELS.get(self.risk, self.risk)

    @property
    def source_label(self):
        return _label(SOURCE_LABELS, Source, self.source)

    @property
    def model_status_label(self):
        return MODEL_STATUS_LABELS.get(self.model_status, self.model_status)

    @property
    def is_pilot(self):
        return self.model_status == PILOT

    @property
    def is_open(self):
        return self.status in {s.value for s in OPEN_STATUSES}


class Hit(models.Model):
    """One arrival of a lead from outside: an engine lead id, a batch row, a live (site, day)
    group. Its key makes every import idempotent."""
    key = models.CharField(max_length=400, unique=True)  # external@lead ref
    external = models.CharField(max_length=300, db_index=True)  # engine lead id, batch row, live site+day
    lead = models.ForeignKey(Lead, on_delete=models.PROTECT, related_name="hits")
    source = models.CharField(max_length=16)
    batch = models.ForeignKey(Batch, null=True, on_delete=models.PROTECT, related_name="hits")
    description = models.TextField(blank=True, default="")
    arrived_at = models.DateTimeField(auto_now_add=True)


class Evidence(models.Model):
    """One evidence line (leads.md `evidence`; for LIVE leads one DUPLICATE attempt)."""
    key = models.CharField(max_length=300, unique=True)  # idempotency: the line's identity
    lead = models.ForeignKey(Lead, on_delete=models.PROTECT, related_name="evidence")
    hit = models.ForeignKey(Hit, on_delete=models.PROTECT, related_name="evidence")
    role = models.CharField(max_length=8)  # first | later | line
    site_id = models.CharField(max_length=64)
    settlement_id = models.CharField(max_length=128, blank=True, default="")
    line_no = models.IntegerField(null=True)
    settled_at = models.DateTimeField(null=True)
    canonical_code = models.CharField(max_length=128, blank=True, default="")
    product_id = models.CharField(max_length=64, blank=True, default="")
    insured_pseudonym = models.CharField(max_length=64, blank=True, default="", db_index=True)
    amount = Money(max_digits=16, decimal_places=2, null=True)
    first_site_id = models.CharField(max_length=64, blank=True, default="")  # LIVE: who sold it first


class Entry(models.Model):
    """The lead's history: who, when, what changed (from -> to), why. Append-only."""
    lead = models.ForeignKey(Lead, on_delete=models.PROTECT, related_name="entries")
    at = models.DateTimeField(auto_now_add=True)
    actor = models.CharField(max_length=150)  # username, or "system:<component>"
    kind = models.CharField(max_length=24)    # CREATED, STATUS, ASSIGN, EVIDENCE, REPORT, ACTION, SANCTION...
    field = models.CharField(max_length=80, blank=True, default="")
    before = models.TextField(blank=True, default="")
    after = models.TextField(blank=True, default="")
    reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["at", "id"]

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise AppendOnly("history entries are never edited; add a correcting entry")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnly("history entries are never deleted")


class Action(models.Model):
    """A 处理结果 recorded on a lead, against an institution (site) or an insured person."""
    lead = models.ForeignKey(Lead, on_delete=models.PROTECT, related_name="actions")
    code = models.CharField(max_length=24, choices=[(a.code, a.label) for a in ACTIONS.values()])
    party = models.CharField(max_length=12)      # rules.Party
    subject_id = models.CharField(max_length=64)  # site id or insured pseudonym
    site_kind = models.CharField(max_length=16, blank=True, default="")
    region = models.CharField(max_length=32, blank=True, default="", db_index=True)
    decided_on = models.DateField(db_index=True)
    amount_wan = Money(max_digits=14, decimal_places=2, null=True)     # 万元
    monthly_turnover_wan = Money(max_digits=14, decimal_places=2, null=True)  # 月营业额
    violation_wan = Money(max_digits=14, decimal_places=2, null=True)  # 违规额
    confiscated_wan = Money(max_digits=14, decimal_places=2, null=True)  # 罚没额
    note = models.TextField(blank=True, default="")
    actor = models.CharField(max_length=150)
    at = models.DateTimeField(auto_now_add=True)
    sanction = models.OneToOneField("SanctionRequest", null=True, blank=True, on_delete=models.PROTECT,
                                    related_name="action")

    @property
    def label(self):
        return ACTIONS[self.code].label if self.code in ACTIONS else self.code


class Inspection(models.Model):
    """An inspection of a site on a lead (检查), for the report's remarks (of which on site)."""
    lead = models.ForeignKey(Lead, on_delete=models.PROTECT, related_name="inspections")
    site_id = models.CharField(max_length=64)
    region = models.CharField(max_length=32, blank=True, default="")
    on_site = models.BooleanField(default=False)
    inspected_on = models.DateField()
    actor = models.CharField(max_length=150)


class SanctionRequest(models.Model):
    """A sanction through two people: proposed by one, approved by another supervisor, then sent
    to tracecode's Admin API (SetSanction, request_id = this row's uuid). Lifting likewise.
    A call that could not be made stays pending (`call`) and is retried until it is answered."""
    PROPOSED, REJECTED, APPROVED, REFUSED, LIFT_PROPOSED, LIFTED = (
        "PROPOSED", "REJECTED", "APPROVED", "REFUSED", "LIFT_PROPOSED", "LIFTED")
    STATE_LABELS = {PROPOSED: "待审批", REJECTED: "未批准", APPROVED: "已批准", REFUSED: "服务拒绝",
                    LIFT_PROPOSED: "解除待审批", LIFTED: "已解除"}
    lead = models.ForeignKey(Lead, on_delete=models.PROTECT, related_name="sanctions")
    request_id = models.UUIDField(default=uuid.uuid4, unique=True)
    action_code = models.CharField(max_length=24)  # rules.SANCTION_ACTIONS
    kind = models.CharField(max_length=24)          # Admin API SanctionKind name
    subject_type = models.CharField(max_length=8)   # SITE | INSURED
    subject_id = models.CharField(max_length=64)    # site id or pseudonym (never a raw id)
    valid_from = models.DateTimeField(null=True)
    valid_until = models.DateTimeField(null=True)
    reason = models.TextField()
    # 暂停医保服务 / 解除定点协议: the reduced-fund-loss figures (万元), into the action on approval.
    monthly_turnover_wan = Money(max_digits=14, decimal_places=2, null=True)
    violation_wan = Money(max_digits=14, decimal_places=2, null=True)
    confiscated_wan = Money(max_digits=14, decimal_places=2, null=True)
    state = models.CharField(max_length=16, default=PROPOSED)
    proposed_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    proposed_at = models.DateTimeField(auto_now_add=True)
    approved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+")
    approved_at = models.DateTimeField(null=True)
    lift_reason = models.TextField(blank=True, default="")
    lift_proposed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT,
                                         related_name="+")
    lift_approved_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT,
                                         related_name="+")
    # The call still owed to the service: "" (none), "SET" or "LIFT"; retried by gateway.retry_pending.
    call = models.CharField(max_length=8, blank=True, default="", db_index=True)
    attempts = models.IntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    next_try_at = models.DateTimeField(null=True)
    sanction_id = models.CharField(max_length=64, blank=True, default="")  # the service's id
    # What the service last said: in force at the counter or not (None: not known yet).
    service_in_force = models.BooleanField(null=True)
    service_checked_at = models.DateTimeField(null=True)

    @property
    def state_label(self):
        return self.STATE_LABELS.get(self.state, self.state)

    @property
    def action_label(self):
        return ACTIONS[self.action_code].label if self.action_code in ACTIONS else self.action_code


class ModelConfig(models.Model):
    """A configuration of the leads engine's models (a TOML file of leads/config.py), proposed with
    its backtest report and adopted by a second person (modelconf.py). Never deleted: the
    configuration in force at any time, and who put it there, stays readable."""
    PROPOSED, ADOPTED, REJECTED, SUPERSEDED = "PROPOSED", "ADOPTED", "REJECTED", "SUPERSEDED"
    STATE_LABELS = {PROPOSED: "待审批", ADOPTED: "在用", REJECTED: "未批准", SUPERSEDED: "已替换"}
    toml = models.TextField(blank=True, default="")
    sha256 = models.CharField(max_length=64)
    report = models.TextField(blank=True, default="")  # backtest.json, as uploaded ('' = none)
    reason = models.TextField()
    state = models.CharField(max_length=12, default=PROPOSED, db_index=True)
    proposed_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    proposed_at = models.DateTimeField(auto_now_add=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+")
    decided_at = models.DateTimeField(null=True)
    decision_note = models.TextField(blank=True, default="")
    superseded_at = models.DateTimeField(null=True)

    class Meta:
        # At most one configuration in force.
        constraints = [models.UniqueConstraint(fields=["state"], condition=Q(state="ADOPTED"),
                                               name="one_adopted_model_config")]

    @property
    def state_label(self):
        return self.STATE_LABELS.get(self.state, self.state)

    def delete(self, *args, **kwargs):
        raise AppendOnly("a model configuration is kept")


class ReportSnapshot(models.Model):
    """A submitted weekly report, frozen: its content (canonical JSON) and that content's SHA-256."""
    region = models.CharField(max_length=32)
    week_start = models.DateField()
    content = models.TextField()
    sha256 = models.CharField(max_length=64)
    submitted_by = models.CharField(max_length=150)
    submitted_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["region", "week_start"], name="one_report_per_week")]

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise AppendOnly("a submitted report is frozen")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnly("a submitted report is frozen")


class LoginThrottle(models.Model):
    """Failed logins per user and per address (views.ThrottledLoginForm), in the database so
    that every console process (waitress threads, several servers behind one proxy) counts
    the same failures. `key` is "user:<sha256 of the lower-cased name>" or "addr:<address>":
    names typed at the login form are not stored as they were typed."""
    key = models.CharField(max_length=80, unique=True)
    failures = models.IntegerField(default=0)
    first_at = models.DateTimeField()
    last_at = models.DateTimeField()


class Alert(models.Model):
    """An alert a site's own counter raised (issue 28): a flagged attempt, a refusal, a notice,
    from the audit feed (stream.py). The site answers it through the pharmacy API (alerts.py)
    with a cause from rules.ANSWER_CAUSES and a note; the answer is kept here, once, and goes on
    the lead the alert is evidence of (an Entry, and shown on the lead page)."""
    # The event's own identity (kind, site, settlement, line, code): a redelivery is the same alert.
    key = models.CharField(max_length=300, unique=True)
    # What the site is given to answer by: not the row id, so alerts cannot be counted by guessing.
    public_id = models.UUIDField(default=uuid.uuid4, unique=True)
    site_id = models.CharField(max_length=64, db_index=True)
    kind = models.CharField(max_length=12)            # rules.ALERT_KINDS
    verdict = models.CharField(max_length=32, blank=True, default="")  # ATTEMPT: the verdict's name
    detail = models.TextField(blank=True, default="")
    canonical_code = models.CharField(max_length=128, blank=True, default="")
    settlement_id = models.CharField(max_length=128, blank=True, default="")
    line_index = models.IntegerField(default=-1)
    raised_at = models.DateTimeField(db_index=True)  # the settlement's time
    received_at = models.DateTimeField(auto_now_add=True)
    lead = models.ForeignKey(Lead, null=True, blank=True, on_delete=models.PROTECT, related_name="alerts")
    # The answer (empty until answered; written once, rules in alerts.answer).
    cause = models.CharField(max_length=16, blank=True, default="")
    note = models.TextField(blank=True, default="")
    answered_at = models.DateTimeField(null=True, db_index=True)
    answered_by = models.CharField(max_length=80, blank=True, default="")  # the identity, site:<id>
    # The inspector's acceptance of the answer (it closed the lead as 查证不属实 with its cause).
    accepted_by = models.CharField(max_length=150, blank=True, default="")
    accepted_at = models.DateTimeField(null=True)

    class Meta:
        indexes = [models.Index(fields=["site_id", "raised_at"])]

    @property
    def kind_label(self):
        from .rules import ALERT_KINDS
        return ALERT_KINDS.get(self.kind, self.kind)

    @property
    def cause_label(self):
        from .rules import ANSWER_CAUSES
        return ANSWER_CAUSES[self.cause].label if self.cause in ANSWER_CAUSES else self.cause


class PublicQueryWindow(models.Model):
    """The public code query's rate limit (public.py): queries of one client address in its
    current one-minute window, in the database so that every console process counts alike."""
    address = models.CharField(max_length=64, unique=True)
    window_start = models.DateTimeField()
    count = models.IntegerField(default=0)


class PublicQueryCount(models.Model):
    """Queries of the public code query by outcome, ever (tracecode_console_public_queries_total)."""
    outcome = models.CharField(max_length=16, unique=True)
    count = models.BigIntegerField(default=0)
