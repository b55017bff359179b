"""The console's pages. Every view checks the user's role on the server (workflow.py and
roles.has); hiding a button is only a courtesy. A lead the user may not see is a 404."""
from __future__ import annotations

import logging
from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Case, IntegerField, Q, Value, When
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from . import forms, gateway, intake, packs, report, workflow
from .models import Batch, Lead, ReportSnapshot, SanctionRequest
from .roles import has, role_of
from .rules import (ACTIONS, CAUSES, RISK_LABELS, RISK_ORDER, ROLES, SITE_KIND_LABELS, SOURCE_LABELS,
                    STATUS_LABELS, SUBJECT_LABELS, Perm, Source, Status)

log = logging.getLogger("tracecode.console.views")


def roles_context(request):
    user = getattr(request, "user", None)
    role = role_of(user) if user is not None else ""
    return {"role": role, "role_label": ROLES[role].label if role else "",
            "can": {p.name: has(user, p) for p in Perm} if user is not None else {}}


def _guard(view):
    """Login required; Forbidden -> 403, RuleError -> a message and back to the page."""
    @login_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except workflow.Forbidden as exc:
            raise PermissionDenied(str(exc)) from None
        except workflow.RuleError as exc:
            messages.error(request, str(exc))
            return redirect(request.META.get("HTTP_REFERER") or reverse("lead-list"))
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
    f = {k: request.GET.get(k, "").strip() for k in FILTERS}
    if f["status"]:
        qs = qs.filter(status=f["status"]) if f["status"] != "OPEN" else qs.exclude(status=Status.CLOSED.value)
    if f["source"]:
        qs = qs.filter(source=f["source"])
    if f["batch"]:
        qs = qs.filter(batch_id=f["batch"]) if f["batch"].isdigit() else qs.none()
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
    if not form.is_valid():
        _form_errors(request, form)
        return redirect("lead-list")
    return redirect(f"{reverse('lead-list')}?subject={intake.as_pseudonym(form.cleaned_data['insured_id'])}")


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
        "risk_label": RISK_LABELS.get(lead.risk, lead.risk), "cause_label": CAUSES[lead.cause].label if lead.cause else "",
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
    })


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
    insured_id = form.data.get("insured_id", "").strip() if form.is_valid() else ""
    if req.subject_type == "INSURED" and insured_id and intake.as_pseudonym(insured_id) != req.subject_id:
        raise workflow.RuleError("证件号与线索对象的化名不符（与线索对象的化名核对）")
    return insured_id


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
    form = forms.ReasonForm(request.POST)
    workflow.reject_sanction(req, request.user, form.data.get("reason", ""))
    return redirect("lead-detail", ref=req.lead.ref)


@require_POST
@_guard
def sanction_lift(request, request_id):
    req = _sanction(request, request_id)
    form = forms.ReasonForm(request.POST)
    workflow.propose_lift(req, request.user, form.data.get("reason", ""))
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
    workflow.reject_lift(req, request.user, request.POST.get("reason", ""))
    return redirect("lead-detail", ref=req.lead.ref)


# --- imports -------------------------------------------------------------------------------


def _report_messages(request, rep: intake.ImportReport) -> None:
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
                if kind == "engine":
                    ev = d.get("evidence")
                    rep = intake.import_engine(d["leads"].name, ev.name if ev else None, leads_data=d["leads"].read(),
                                               evidence_data=ev.read() if ev else None)
                elif kind == "batch":
                    rep = intake.import_batch(d["file"].name, Source(d["source"]), d["number"], d["received_on"],
                                              data=d["file"].read(), user=request.user)
                else:
                    rep = intake.import_sites(d["file"].name, data=d["file"].read())
            except (ValueError, KeyError) as exc:
                raise workflow.RuleError(f"导入失败：{exc}") from None
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
    return _xlsx_response(report.xlsx(report.snapshot_content(snap), sha=snap.sha256),
                          f"weekly-{snap.region}-{snap.week_start}-submitted.xlsx")


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
