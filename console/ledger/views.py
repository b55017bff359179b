"""The console's pages. Every view checks the user's role on the server (workflow.py and
roles.has); hiding a button is only a courtesy. A lead the user may not see is a 404."""
from __future__ import annotations

import logging
import re
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.db.models import Case, IntegerField, Q, Value, When
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from tracecode.rules.insured import InsuredIdError
from tracecode.rules.text import first_refused

from . import alerts, effect, forms, gateway, intake, modelconf, packs, report, workflow
from .models import Alert, Batch, Lead, ModelConfig, ReportSnapshot, SanctionRequest
from .roles import has, role_of
from .rules import (ACTIONS, CAUSES, RISK_LABELS, RISK_ORDER, ROLES, SITE_KIND_LABELS, SOURCE_LABELS,
                    STATUS_LABELS, SUBJECT_LABELS, Cause, Perm, Source, Status)

log = logging.getLogger("tracecode.console.views")


def roles_context(request):
    user = getattr(request, "user", None)
    role = role_of(user) if user is not None else ""
    return {"role": role, "role_label": ROLES[role].label if role else "",
            "can": {p.name: has(user, p) for p in Perm} if user is not None else {}}


# A user with none of these (the auditor) is read-only: any POST of theirs is refused at the door.
WRITE_PERMS = tuple(p for p in Perm if p not in (Perm.VIEW_ALL, Perm.VIEW_REPORT))


def back(request) -> str:
    """Where to send the user after a refusal: the page they came from when it is one of ours
    (never a foreign Referer: that would make the console an open redirect), else the list."""
    referer = request.META.get("HTTP_REFERER", "")
    if referer and url_has_allowed_host_and_scheme(referer, allowed_hosts={request.get_host()},
                                                   require_https=request.is_secure()):
        return referer
    return reverse("lead-list")


def _guard(view):
    """Login required; every POST of a read-only role (the auditor) a 403, whatever the view
    (docs/console.md: an auditor's POST is always refused, the person search included);
    Forbidden -> 403, RuleError -> a message and back to the page."""
    @login_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        try:
            if request.method == "POST" and not any(has(request.user, p) for p in WRITE_PERMS):
                raise workflow.Forbidden("只读角色不能提交")
            return view(request, *args, **kwargs)
        except workflow.Forbidden as exc:
            raise PermissionDenied(str(exc)) from None
        except workflow.RuleError as exc:
            messages.error(request, str(exc))
            return redirect(back(request))
    return wrapped


def _lead(request, ref: str) -> Lead:
    lead = get_object_or_404(Lead, ref=ref)
    if not workflow.can_see(request.user, lead):
        raise Http404("线索不存在或无权查看")
    return lead


def _form_errors(request, form) -> None:
    for field, errs in form.errors.items():
        label = form.fields[field].label if field in form.fields else ""
        messages.error(request, f"{label}：{'；'.join(errs)}" if label else "；".join(errs))


# --- the list ------------------------------------------------------------------------------

SORTS = {
    "repeat": ("-repeat_count", "risk_rank", "-score", "-created_at"),
    "risk": ("risk_rank", "-score", "-created_at"),
    "score": ("-score", "-created_at"),
    "newest": ("-created_at",),
    "oldest": ("created_at",),
    "amount": ("-amount", "-created_at"),
}
FILTERS = ("status", "source", "batch", "model", "risk", "region", "subject")


@require_safe
@_guard
def lead_list(request):
    qs = workflow.visible_leads(request.user).select_related("assignee", "batch")
    f = {k: request.GET.get(k, "").strip()[:400] for k in FILTERS}
    if any(first_refused(v) for v in f.values()):
        # A NUL in a filter would make PostgreSQL's driver raise: no stored value holds one anyway.
        qs = qs.none()
    if f["status"]:
        qs = qs.filter(status=f["status"]) if f["status"] != "OPEN" else qs.exclude(status=Status.CLOSED.value)
    if f["source"]:
        qs = qs.filter(source=f["source"])
    if f["batch"]:
        # (an id beyond 64 bits would overflow SQLite's INTEGER in the query itself)
        qs = qs.filter(batch_id=int(f["batch"])) if f["batch"].isascii() and f["batch"].isdigit() \
            and int(f["batch"]) < 2**63 else qs.none()
    if f["model"]:
        qs = qs.filter(model=f["model"])
    if f["risk"]:
        qs = qs.filter(risk=f["risk"])
    if f["region"]:
        qs = qs.filter(region=f["region"])
    if f["subject"]:
        s = f["subject"]
        qs = qs.filter(Q(subject_id=s) | Q(ref=s) | Q(subject_id__contains=f"+{s}") | Q(subject_id__startswith=f"{s}+")
                       | Q(evidence__insured_pseudonym=s)).distinct()
    sort = request.GET.get("sort", "repeat")
    risk_rank = Case(*[When(risk=k, then=Value(v)) for k, v in RISK_ORDER.items()], default=Value(9),
                     output_field=IntegerField())
    qs = qs.annotate(risk_rank=risk_rank).order_by(*SORTS.get(sort, SORTS["repeat"]))
    visible = workflow.visible_leads(request.user)
    options = {
        "models": sorted(set(visible.values_list("model", flat=True))),
        "regions": sorted(set(visible.exclude(region="").values_list("region", flat=True))),
        "batches": Batch.objects.filter(leads__in=visible).distinct().order_by("-received_on"),
    }
    page = list(qs[:500])
    return render(request, "ledger/list.html", {
        "leads": page, "total": qs.count(), "f": f, "sort": sort, "options": options,
        "statuses": STATUS_LABELS, "sources": SOURCE_LABELS, "risks": RISK_LABELS,
        "person_form": forms.PersonSearchForm()})


@require_POST
@_guard
def person_search(request):
    """Search by a person's raw id: the console computes the pseudonym; the id goes no further
    (POST, so it is in no URL, log or history)."""
    form = forms.PersonSearchForm(request.POST)
    if not form.is_valid():  # the form checks the id (tracecode.rules.insured) and never echoes it
        _form_errors(request, form)
        return redirect("lead-list")
    return redirect(f"{reverse('lead-list')}?subject={form.cleaned_data['insured_id']}")


# --- one lead ------------------------------------------------------------------------------

MAX_PACK_HISTORIES = 12


@require_safe
@_guard
def lead_detail(request, ref):
    lead = _lead(request, ref)
    user = request.user
    evidence = list(lead.evidence.select_related("hit").order_by("settled_at", "id"))
    codes = list(dict.fromkeys(e.canonical_code for e in evidence if e.canonical_code))
    histories = packs.histories(codes[:MAX_PACK_HISTORIES])
    edges = packs.chain(evidence, histories)
    sites = set(workflow.lead_sites(lead))
    hits = list(lead.hits.select_related("batch").order_by("arrived_at"))
    sanctions = list(lead.sanctions.select_related("proposed_by", "approved_by", "lift_proposed_by").order_by("proposed_at"))
    for s in sanctions:  # what the service says now, beside what the ledger decided
        s.view = gateway.service_view(s) if s.sanction_id else None
    transitions = workflow.allowed_transitions(user, lead)
    own = lead.assignee_id == user.id or (has(user, Perm.VIEW_ALL) and has(user, Perm.REVIEW))
    today = timezone.localdate()
    return render(request, "ledger/detail.html", {
        "lead": lead, "evidence": evidence, "histories": histories, "more_codes": max(0, len(codes) - MAX_PACK_HISTORIES),
        "chain_svg": packs.chain_svg(edges, sites), "edges": edges, "hits": hits,
        "entries": lead.entries.all(), "actions": lead.actions.order_by("at"), "inspections": lead.inspections.all(),
        "sanctions": sanctions, "transitions": transitions,
        "subject_label": SUBJECT_LABELS.get(lead.subject_kind, lead.subject_kind),
        "risk_label": RISK_LABELS.get(lead.risk, lead.risk), "cause_label": _cause_label(lead.cause),
        "may_work": own and has(user, Perm.WORK) and lead.is_open,
        "may_act": own and has(user, Perm.RECORD_ACTION) and lead.status in (Status.CONFIRMED.value, Status.CLOSED.value),
        "may_propose": own and has(user, Perm.PROPOSE_SANCTION) and lead.status == Status.CONFIRMED.value,
        "assign_form": forms.AssignForm(initial={"assignee": lead.assignee_id}) if has(user, Perm.ASSIGN) and lead.is_open else None,
        "transition_form": forms.TransitionForm(), "text_form": forms.TextForm(),
        "action_form": forms.ActionForm(initial={"decided_on": today, "subject_id": next(iter(sites)) if len(sites) == 1 else ""}),
        "inspection_form": forms.InspectionForm(initial={"inspected_on": today, "site_id": next(iter(sites)) if len(sites) == 1 else ""}),
        "proposal_form": forms.ProposalForm(initial={"subject_id": next(iter(sites)) if len(sites) == 1 else ""}),
        "approve_form": forms.ApproveForm(), "reason_form": forms.ReasonForm(),
        "handed_down": lead.source in {s.value for s in (Source.NATIONAL, Source.PROVINCIAL, Source.COMPLAINT)},
        "site_kinds": SITE_KIND_LABELS, "statuses": STATUS_LABELS,
        # The pharmacy's answers to the alerts this lead holds (alerts.py), and whether this user
        # may accept one (the transition to 查证不属实 is the user's to make).
        "alerts": alerts_on(lead),
        "may_accept": own and has(user, Perm.WORK) and lead.status == Status.IN_PROGRESS.value,
    })


def alerts_on(lead: Lead) -> list[Alert]:
    found = list(lead.alerts.order_by("raised_at", "id")[:200])
    for a in found:
        a.message = alerts.message(a)
        a.acceptable = bool(a.answered_at) and not a.accepted_at and a.cause != "OTHER"
    return found


ALERT_STATES = {"open": "待答复", "answered": "已答复", "all": "全部"}


@require_safe
@_guard
def alert_overview(request):
    """Every pharmacy's alerts and answers (supervisors and auditors): who has not answered, and
    the answers to alerts that have no lead (only a DUPLICATE's alert is evidence of one)."""
    if not has(request.user, Perm.VIEW_ALL):
        raise workflow.Forbidden("无权查看药店预警")
    which = request.GET.get("state", "open")
    if which not in ALERT_STATES:
        which = "open"
    site = request.GET.get("site", "").strip()[:64]
    qs = Alert.objects.select_related("lead")
    if which == "open":
        qs = qs.filter(answered_at__isnull=True)
    elif which == "answered":
        qs = qs.filter(answered_at__isnull=False)
    if site and first_refused(site) is None:
        qs = qs.filter(site_id=site)
    found = list(qs.order_by("raised_at", "id")[:500])
    now = timezone.now()
    for a in found:
        a.message = alerts.message(a)
        a.age_h = int((now - a.raised_at).total_seconds() // 3600)
    counts = alerts.unanswered(now)
    return render(request, "ledger/alerts.html", {"alerts": found, "state": which, "site": site, "states": ALERT_STATES,
                                                  "total": counts.total, "over_48h": counts.older["48h"],
                                                  "over_5d": counts.older["5d"]})


@require_POST
@_guard
def alert_accept(request, pk):
    """The inspector accepts a pharmacy's technical answer: the lead becomes 查证不属实 with it."""
    a = get_object_or_404(Alert.objects.select_related("lead"), pk=pk)
    if a.lead is None or not workflow.can_see(request.user, a.lead):
        raise Http404("预警不存在或无权查看")
    lead = alerts.accept(a.pk, request.user, request.POST.get("reason", ""))
    messages.success(request, f"已采纳药店答复，线索变为「{lead.status_label}」")
    return redirect("lead-detail", ref=lead.ref)


def _cause_label(cause: str) -> str:
    """A stored cause the rules no longer know is shown as it is, not a 500."""
    try:
        return CAUSES[Cause(cause)].label if cause else ""
    except (ValueError, KeyError):
        return cause


def _lead_form(form_class, needs: Perm | None = None):
    """A POST on one lead through one form: the lead (as the caller may see it), the permission
    when one is needed, the form's errors shown, and back to the lead's page. The decorated
    function gets the valid data and returns the success message (or None)."""
    def wrap(apply):
        @require_POST
        @_guard
        @wraps(apply)
        def view(request, ref):
            lead = _lead(request, ref)
            form = form_class(request.POST)
            if needs is not None and not has(request.user, needs):
                raise workflow.Forbidden("无分派权限" if needs == Perm.ASSIGN else "无此权限")
            if form.is_valid():
                message = apply(request, lead, form.cleaned_data)
                if message:
                    messages.success(request, message)
            else:
                _form_errors(request, form)
            return redirect("lead-detail", ref=ref)
        return view
    return wrap


@_lead_form(forms.AssignForm, needs=Perm.ASSIGN)
def lead_assign(request, lead, d):
    workflow.assign(lead, d["assignee"], request.user, d["reason"])
    return f"已分派给 {d['assignee'].username}"


@_lead_form(forms.TransitionForm)
def lead_transition(request, lead, d):
    try:
        to = Status(d["to"])
    except ValueError:
        raise workflow.RuleError(f"未知状态 {d['to']}") from None
    workflow.transition(lead, to, request.user, d["reason"], d["cause"])
    return f"状态已变为「{STATUS_LABELS[to]}」"


@_lead_form(forms.TextForm)
def lead_report(request, lead, d):
    workflow.set_handling_report(lead, d["text"], request.user)
    return "处理报告已保存"


@_lead_form(forms.TextForm)
def lead_note(request, lead, d):
    workflow.add_note(lead, d["text"], request.user)
    return None


@_lead_form(forms.ActionForm)
def lead_action(request, lead, d):
    workflow.record_action(lead, workflow.ActionInput(
        code=d["code"], subject_id=d["subject_id"], decided_on=d["decided_on"], amount_wan=d["amount_wan"],
        note=d["note"]), request.user)
    return f"已登记处理结果「{ACTIONS[d['code']].label}」"


@_lead_form(forms.InspectionForm)
def lead_inspection(request, lead, d):
    workflow.add_inspection(lead, d["site_id"], d["on_site"], d["inspected_on"], request.user)
    return "已登记检查"


@_lead_form(forms.ProposalForm)
def lead_propose(request, lead, d):
    req = workflow.propose_sanction(lead, workflow.SanctionProposal(
        action_code=d["action_code"], subject_id=d["subject_id"], reason=d["reason"],
        valid_from=d["valid_from"], valid_until=d["valid_until"],
        monthly_turnover_wan=d["monthly_turnover_wan"], violation_wan=d["violation_wan"],
        confiscated_wan=d["confiscated_wan"]), request.user)
    return f"已提议「{req.action_label}」，待另一名审核人批准"


def _sanction(request, request_id) -> SanctionRequest:
    req = get_object_or_404(SanctionRequest.objects.select_related("lead"), request_id=request_id)
    if not workflow.can_see(request.user, req.lead):
        raise Http404("无此制裁")
    return req


def _delivery_message(request, req: SanctionRequest) -> None:
    if req.call:
        messages.warning(request, f"结算服务暂不可达，已列入待下发队列并将自动重试：{req.last_error}")
    elif req.state == SanctionRequest.REFUSED:
        messages.error(request, f"结算服务拒绝：{req.last_error}")
    else:
        messages.success(request, "已下发结算服务" + ("，当前生效" if req.service_in_force else ""))


def _typed_insured_id(request, req: SanctionRequest) -> str:
    """The raw id an approver may type for a card suspension ('' when none). The person is named
    by the lead's pseudonym; a typed id is a check that the right person is meant: it must match
    that pseudonym, and is never kept."""
    form = forms.ApproveForm(request.POST)
    if not form.is_valid():  # a typed id the form refuses is not silently dropped (approving by pseudonym)
        raise workflow.RuleError("参保人证件号：" + "；".join(e for errs in form.errors.values() for e in errs))
    insured_id = form.cleaned_data.get("insured_id", "").strip()
    if req.subject_type == "INSURED" and insured_id:
        try:
            pseudonym = intake.as_pseudonym(insured_id)
        except InsuredIdError as exc:
            raise workflow.RuleError(f"参保人证件号无效：{exc.rule}") from None
        if pseudonym != req.subject_id:
            raise workflow.RuleError("证件号与线索对象的化名不符（与线索对象的化名核对）")
    return insured_id


def _reason_of(request) -> str:
    """The reason of a POST through its form (length, no NUL: PostgreSQL cannot store one)."""
    form = forms.ReasonForm(request.POST)
    if not form.is_valid():
        raise workflow.RuleError("理由：" + "；".join(e for errs in form.errors.values() for e in errs))
    return form.cleaned_data["reason"]


@require_POST
@_guard
def sanction_approve(request, request_id):
    req = _sanction(request, request_id)
    insured_id = _typed_insured_id(request, req)
    req = workflow.approve_sanction(req, request.user)
    _delivery_message(request, gateway.deliver(req, insured_id=insured_id))
    return redirect("lead-detail", ref=req.lead.ref)


@require_POST
@_guard
def sanction_retry(request, request_id):
    req = _sanction(request, request_id)
    if not has(request.user, Perm.APPROVE_SANCTION):
        raise workflow.Forbidden("无权限下发制裁")
    insured_id = _typed_insured_id(request, req)
    _delivery_message(request, gateway.deliver(req, insured_id=insured_id))
    return redirect("lead-detail", ref=req.lead.ref)


@require_POST
@_guard
def sanction_reject(request, request_id):
    req = _sanction(request, request_id)
    workflow.reject_sanction(req, request.user, _reason_of(request))
    return redirect("lead-detail", ref=req.lead.ref)


@require_POST
@_guard
def sanction_lift(request, request_id):
    req = _sanction(request, request_id)
    workflow.propose_lift(req, request.user, _reason_of(request))
    messages.success(request, "已提议解除，待另一名审核人批准")
    return redirect("lead-detail", ref=req.lead.ref)


@require_POST
@_guard
def sanction_lift_approve(request, request_id):
    req = _sanction(request, request_id)
    req = workflow.approve_lift(req, request.user)
    _delivery_message(request, gateway.deliver(req))
    return redirect("lead-detail", ref=req.lead.ref)


@require_POST
@_guard
def sanction_lift_reject(request, request_id):
    req = _sanction(request, request_id)
    workflow.reject_lift(req, request.user, _reason_of(request))
    return redirect("lead-detail", ref=req.lead.ref)


# --- imports -------------------------------------------------------------------------------


def _report_messages(request, rep: intake.ImportReport) -> None:
    if rep.refused:
        messages.error(request, f"文件有 {len(rep.problems)} 处错误，整份文件未导入（改正后重新导入）：")
    else:
        messages.success(request, f"新建线索 {rep.leads_created} 条，并入已有线索 {rep.leads_extended} 条，"
                                  f"新增证据 {rep.evidence_added} 条，未变化 {rep.unchanged} 条")
    for w in rep.warnings:
        messages.warning(request, w)
    for p in rep.problems[:50]:
        messages.error(request, str(p))
    if len(rep.problems) > 50:
        messages.error(request, f"……另有 {len(rep.problems) - 50} 行错误")


@require_http_methods(["GET", "POST"])
@_guard
def imports(request):
    if not has(request.user, Perm.IMPORT):
        raise workflow.Forbidden("无导入权限")
    kind = request.POST.get("kind", "")
    engine_form = forms.EngineImportForm(request.POST or None, request.FILES or None) if kind == "engine" else forms.EngineImportForm()
    batch_form = forms.BatchImportForm(request.POST or None, request.FILES or None) if kind == "batch" else forms.BatchImportForm()
    sites_form = forms.SitesImportForm(request.POST or None, request.FILES or None) if kind == "sites" else forms.SitesImportForm()
    if request.method == "POST":
        form = {"engine": engine_form, "batch": batch_form, "sites": sites_form}.get(kind)
        if form is None:
            raise workflow.RuleError("未知的导入类型")
        if form.is_valid():
            d = form.cleaned_data
            try:
                # The uploads themselves: intake checks their size before it reads them.
                if kind == "engine":
                    ev = d.get("evidence")
                    rep = intake.import_engine(d["leads"].name, ev.name if ev else None, leads_data=d["leads"],
                                               evidence_data=ev)
                elif kind == "batch":
                    rep = intake.import_batch(d["file"].name, Source(d["source"]), d["number"], d["received_on"],
                                              data=d["file"], user=request.user)
                else:
                    rep = intake.import_sites(d["file"].name, data=d["file"])
            except (ValueError, KeyError) as exc:
                raise workflow.RuleError(f"导入失败：{exc}") from None
            except DatabaseError as exc:
                # Every row was checked against the columns first, so this is not expected: the
                # transaction rolled back (nothing imported); say so rather than answer a 500.
                log.error("import of %s refused by the database: %s", kind, type(exc).__name__)
                raise workflow.RuleError("导入失败：数据库拒绝写入，整份文件未导入") from None
            _report_messages(request, rep)
            return redirect("imports")
        _form_errors(request, form)
    return render(request, "ledger/imports.html", {"engine_form": engine_form, "batch_form": batch_form,
                                                   "sites_form": sites_form})


# --- the weekly report ---------------------------------------------------------------------


def _report_args(request):
    form = forms.ReportForm(request.GET or None)
    if request.GET and form.is_valid():
        return form, form.cleaned_data["region"], report.week_of(form.cleaned_data["week"])
    return form, "", None


@require_safe
@_guard
def weekly(request):
    if not has(request.user, Perm.VIEW_REPORT):
        raise workflow.Forbidden("无权查看周报表")
    form, region, week = _report_args(request)
    content = report.build(region, week) if week else None
    snap = ReportSnapshot.objects.filter(region=region, week_start=week).first() if week else None
    if snap is not None and not report.snapshot_intact(snap):
        messages.error(request, f"已报送快照 {snap.pk} 的内容与其 SHA-256 不符（被改动过），不能作为报送版本下载")
    # Sheet (一) as the spreadsheet lays it out: counts per kind, then each figure per kind.
    sheet1 = [(row["label"], [row["counts"][k] for k in report.KINDS],
               [row["money"].get(f, {}).get(k, "") for f in report.MONEY for k in report.KINDS])
              for row in (content["institutions"] + [content["institution_total"]] if content else [])]
    return render(request, "ledger/report.html", {
        "sheet1": sheet1, "money_headers": [f"{report.FIGURE_HEADERS[f]}·{h}" for f in report.MONEY
                                            for h in report.KIND_HEADERS],
        "form": form, "content": content, "snapshot": snap, "kind_headers": report.KIND_HEADERS,
        "kinds": report.KINDS, "snapshots": ReportSnapshot.objects.order_by("-week_start", "region")[:50]})


@require_safe
@_guard
def weekly_xlsx(request):
    if not has(request.user, Perm.VIEW_REPORT):
        raise workflow.Forbidden("无权查看周报表")
    form, region, week = _report_args(request)
    if not week:
        raise workflow.RuleError("请选择统筹区和周")
    data = report.xlsx(report.build(region, week))
    return _xlsx_response(data, f"weekly-{region}-{week}.xlsx")


@require_safe
@_guard
def snapshot_xlsx(request, pk):
    if not has(request.user, Perm.VIEW_REPORT):
        raise workflow.Forbidden("无权查看周报表")
    snap = get_object_or_404(ReportSnapshot, pk=pk)
    try:
        content = report.snapshot_content(snap)
    except ValueError:
        # Tampered (content and hash disagree): never serve it as what was submitted.
        log.error("report snapshot %s: content does not match its SHA-256", snap.pk)
        return render(request, "ledger/report.html", {"tampered": snap, "form": forms.ReportForm(),
                                                      "snapshots": ReportSnapshot.objects.order_by("-week_start", "region")[:50]},
                      status=409)
    return _xlsx_response(report.xlsx(content, sha=snap.sha256), f"weekly-{snap.region}-{snap.week_start}-submitted.xlsx")


def _xlsx_response(data: bytes, name: str) -> HttpResponse:
    resp = HttpResponse(data, content_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet")
    resp["Content-Disposition"] = f'attachment; filename="{name}"'
    return resp


@require_POST
@_guard
def weekly_submit(request):
    form = forms.ReportForm(request.POST)
    if not form.is_valid():
        _form_errors(request, form)
        return redirect("weekly")
    snap = report.submit(form.cleaned_data["region"], form.cleaned_data["week"], request.user)
    messages.success(request, f"已报送，快照 SHA-256 {snap.sha256}")
    return redirect(f"{reverse('weekly')}?region={snap.region}&week={snap.week_start}")


# --- the models' configuration: proposed with a backtest, adopted by two (modelconf.py) -------


def _config_reader(request) -> None:
    if not (has(request.user, Perm.VIEW_ALL) or has(request.user, Perm.PROPOSE_CONFIG)):
        raise workflow.Forbidden("无权查看模型配置")


def _upload_text(request, name: str, limit: int) -> str:
    """A text field or an uploaded file of the same name (UTF-8), bounded before it is read."""
    f = request.FILES.get(f"{name}_file")
    if f is None:
        return request.POST.get(name, "")
    if f.size > limit:
        raise workflow.RuleError(f"上传的文件超过 {limit // 1024} KB")
    try:
        return f.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise workflow.RuleError("上传的文件不是 UTF-8 文本") from None


@require_safe
@_guard
def model_configs(request):
    _config_reader(request)
    configs = list(ModelConfig.objects.select_related("proposed_by", "decided_by").order_by("-proposed_at")[:50])
    for c in configs:
        try:
            c.report_rows = modelconf.read_report(c.report)
        except workflow.RuleError:
            c.report_rows = []
    return render(request, "ledger/models.html", {"configs": configs, "adopted": modelconf.adopted()})


@require_POST
@_guard
def model_config_propose(request):
    cfg = modelconf.propose(_upload_text(request, "toml", modelconf.MAX_TOML),
                            _upload_text(request, "report", modelconf.MAX_REPORT),
                            request.POST.get("reason", ""), request.user)
    messages.success(request, f"已提交模型配置 #{cfg.pk}，待另一名审核人批准后生效")
    return redirect("model-configs")


@require_POST
@_guard
def model_config_adopt(request, pk):
    cfg = modelconf.adopt(get_object_or_404(ModelConfig, pk=pk), request.user)
    messages.success(request, f"模型配置 #{cfg.pk} 已生效：引擎下次运行使用该配置")
    return redirect("model-configs")


@require_POST
@_guard
def model_config_reject(request, pk):
    cfg = modelconf.reject(get_object_or_404(ModelConfig, pk=pk), request.user, _reason_of(request))
    messages.success(request, f"模型配置 #{cfg.pk} 未批准")
    return redirect("model-configs")


@require_safe
@_guard
def model_config_adopted(request):
    _config_reader(request)
    cfg = modelconf.adopted()
    if cfg is None:
        raise Http404("尚无生效的模型配置（引擎使用内置配置）")
    resp = HttpResponse(cfg.toml, content_type="application/toml; charset=utf-8")
    resp["Content-Disposition"] = f'attachment; filename="models-{cfg.pk}.toml"'
    return resp


@require_safe
@_guard
def conclusions_csv(request):
    if not has(request.user, Perm.VIEW_ALL):
        raise workflow.Forbidden("无权导出查结结论")
    resp = HttpResponse(modelconf.conclusions_csv(), content_type="text/csv; charset=utf-8")
    resp["Content-Disposition"] = 'attachment; filename="conclusions.csv"'
    return resp


# --- the models' effectiveness (effect.py) -------------------------------------------------------


def _effect_filters(request) -> effect.Filters:
    # Supervisors and auditors (who see every lead): figures over leads an inspector may not open.
    if not has(request.user, Perm.VIEW_ALL):
        raise workflow.Forbidden("无权查看模型成效")
    return effect.Filters.parse(request.GET)


@require_safe
@_guard
def effectiveness(request):
    try:
        f = _effect_filters(request)
    except effect.FilterError as exc:
        messages.error(request, str(exc))
        return render(request, "ledger/effectiveness.html", {"f": effect.Filters(), "eff": None}, status=400)
    eff = effect.compute(f)
    groups = effect.by_model(eff)
    leads = Lead.objects.filter(source=Source.MODEL.value)
    return render(request, "ledger/effectiveness.html", {
        "f": f, "eff": eff, "query": request.GET.urlencode(),
        "totals": [("在用合计", eff.production, "PRODUCTION"), ("试点合计（另计）", eff.pilot, "PILOT")],
        "precision_bars": effect.bars(((label, fig.precision or 0.0,
                                        f"{fig.precision:.1%}（{fig.confirmed}/{fig.concluded}）"
                                        if fig.precision is not None else "未有查结")
                                       for label, fig in groups), scale=1.0),
        "recovered_bars": effect.bars((label, float(fig.recovered_wan), f"{fig.recovered_wan:.2f} 万元")
                                      for label, fig in groups),
        "opened_bars": effect.bars((label, float(fig.opened), f"{fig.opened} 条") for label, fig in groups),
        "options": {"models": sorted(set(leads.values_list("model", flat=True))),
                    "regions": sorted(set(leads.exclude(region="").values_list("region", flat=True)))}})


def _effect_export(request) -> tuple[effect.Effectiveness, str]:
    try:
        f = _effect_filters(request)
    except effect.FilterError as exc:
        raise workflow.RuleError(str(exc)) from None
    parts = [p for p in (f.model, f.version and f"v{f.version}", f.region, f.month_from, f.month_to) if p]
    # Only ASCII letters, digits and -._ in the file name: a region is free text (quotes, Chinese).
    return effect.compute(f), re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(["effectiveness", *parts]))


@require_safe
@_guard
def effectiveness_xlsx(request):
    eff, name = _effect_export(request)
    return _xlsx_response(effect.to_xlsx(eff, "医保大数据模型成效（线索台账统计）"), f"{name}.xlsx")


@require_safe
@_guard
def effectiveness_csv(request):
    eff, name = _effect_export(request)
    resp = HttpResponse(effect.to_csv(eff), content_type="text/csv; charset=utf-8")
    resp["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    return resp
