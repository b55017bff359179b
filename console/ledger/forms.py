"""Django forms for every POST the console takes (validation and CSRF come from Django)."""
from __future__ import annotations

from django import forms
from django.contrib.auth.models import User

from tracecode.rules.insured import InsuredIdError

from .rules import ACTION_TYPES, CAUSES, SANCTION_ACTIONS, SOURCE_LABELS, Source


class AssignForm(forms.Form):
    assignee = forms.ModelChoiceField(queryset=User.objects.none(), label="核查人员")
    reason = forms.CharField(required=False, label="说明", max_length=2000)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["assignee"].queryset = (User.objects.filter(
            is_active=True, groups__permissions__codename="work_lead").distinct().order_by("username"))


class TransitionForm(forms.Form):
    to = forms.CharField(widget=forms.HiddenInput)
    cause = forms.ChoiceField(required=False, label="原因", choices=[("", "—")] + [(c.value, r.label) for c, r in CAUSES.items()])
    reason = forms.CharField(label="理由", widget=forms.Textarea(attrs={"rows": 2}), max_length=4000)


class TextForm(forms.Form):
    text = forms.CharField(label="内容", widget=forms.Textarea(attrs={"rows": 4}), max_length=20000)


class ActionForm(forms.Form):
    code = forms.ChoiceField(label="处理结果", choices=[(a.code, f"{'机构' if a.party.value == 'INSTITUTION' else '参保人'}：{a.label}")
                                                     for a in ACTION_TYPES if not a.sanction])
    subject_id = forms.CharField(required=False, label="处理对象（机构编码）", max_length=64)
    decided_on = forms.DateField(label="处理日期", widget=forms.DateInput(attrs={"type": "date"}))
    amount_wan = forms.DecimalField(required=False, label="金额（万元）", max_digits=14, decimal_places=2, min_value=0)
    note = forms.CharField(required=False, label="说明", max_length=4000)


class InspectionForm(forms.Form):
    site_id = forms.CharField(label="检查机构", max_length=64)
    on_site = forms.BooleanField(required=False, label="现场检查")
    inspected_on = forms.DateField(label="检查日期", widget=forms.DateInput(attrs={"type": "date"}))


class ProposalForm(forms.Form):
    action_code = forms.ChoiceField(label="制裁", choices=[(a.code, a.label) for a in SANCTION_ACTIONS.values()])
    subject_id = forms.CharField(required=False, label="对象机构（机构制裁）", max_length=64)
    valid_from = forms.DateTimeField(required=False, label="开始时间（空：立即）",
                                     widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    valid_until = forms.DateTimeField(required=False, label="截止时间（空：直至解除）",
                                      widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    monthly_turnover_wan = forms.DecimalField(required=False, label="月营业额（万元）", max_digits=14, decimal_places=2, min_value=0)
    violation_wan = forms.DecimalField(required=False, label="违规额（万元）", max_digits=14, decimal_places=2, min_value=0)
    confiscated_wan = forms.DecimalField(required=False, label="罚没额（万元）", max_digits=14, decimal_places=2, min_value=0)
    reason = forms.CharField(label="理由", widget=forms.Textarea(attrs={"rows": 2}), max_length=4000)


class ApproveForm(forms.Form):
    # Card suspension only, optional: the person's id as on the card, checked against the lead's
    # pseudonym, passed to the service, never stored (without it the pseudonym names the person).
    insured_id = forms.CharField(required=False, label="参保人证件号（可选，用于核对，不留存）", max_length=128,
                                 widget=forms.PasswordInput(render_value=False))


class ReasonForm(forms.Form):
    reason = forms.CharField(label="理由", widget=forms.Textarea(attrs={"rows": 2}), max_length=4000)


class EngineImportForm(forms.Form):
    leads = forms.FileField(label="leads 文件（CSV / Parquet）")
    evidence = forms.FileField(required=False, label="evidence 文件（CSV / Parquet）")


class BatchImportForm(forms.Form):
    source = forms.ChoiceField(label="来源", choices=[(s.value, SOURCE_LABELS[s])
                                                     for s in (Source.NATIONAL, Source.PROVINCIAL, Source.COMPLAINT)])
    number = forms.CharField(label="批次号", max_length=64)
    received_on = forms.DateField(label="移交日期", widget=forms.DateInput(attrs={"type": "date"}))
    file = forms.FileField(label="文件（CSV / XLSX）")


class SitesImportForm(forms.Form):
    file = forms.FileField(label="机构名录（CSV / XLSX）")


class PersonSearchForm(forms.Form):
    """A raw insured id in, its pseudonym out (cleaned_data["insured_id"]): checked by
    tracecode.rules.insured first, so another spelling of the same id finds the same person and
    a mistyped one is an error naming the rule (never the id)."""
    insured_id = forms.CharField(label="参保人证件号", max_length=128, widget=forms.PasswordInput(render_value=False))

    def clean_insured_id(self) -> str:
        from .intake import as_pseudonym
        try:
            pseudonym = as_pseudonym(self.cleaned_data["insured_id"])
        except InsuredIdError as exc:
            raise forms.ValidationError(f"证件号无效：{exc.rule}") from None
        if not pseudonym:
            raise forms.ValidationError("请填写证件号")
        return pseudonym


class ReportForm(forms.Form):
    region = forms.CharField(label="统筹区", max_length=32)
    week = forms.DateField(label="周（任一日）", widget=forms.DateInput(attrs={"type": "date"}))
