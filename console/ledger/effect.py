"""The models' effectiveness, measured from the ledger (issue 27, spec leads.md "Proven models").

Per model, version, status, region and month of opening (the cohort of leads a model opened that
month, in the console's time zone), over the engine's leads (source MODEL; handed-down, complaint
and live leads are no model's to prove):

  opened        leads opened
  concluded     of them, concluded (rules.is_concluded: found true or not, closed or not)
  confirmed     of them, 查证属实 as the weekly report counts it (rules.is_confirmed: a technical
                cause counts as unfounded)
  precision     confirmed / concluded (None when nothing is concluded yet)
  recovered     the amounts of the money actions recorded on them (Action.amount_wan, 万元)
  confirmed_amount  the leads' own amounts (元) of the confirmed ones
  median_days   median days from opening to closing (办结), over the closed ones
  repeat_subjects   distinct subjects among them that the ledger had seen before (屡次出现)

Pilot (试点) versions are rows of their own and have their own total beside the production total:
a pilot never adds to the production figures. `rows()` is what the page, the CSV and XLSX
exports and the Prometheus exporter all read.
"""
from __future__ import annotations

import csv
import io
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Iterable

from django.utils import timezone

from tracecode.rules.cells import neutralise_row
from tracecode.rules.text import first_refused

from .models import Action, Lead
from .rules import ACTIONS, MODEL_STATUS_LABELS, PILOT, Source, is_concluded, is_confirmed

MONTH_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


class FilterError(ValueError):
    """A filter the page cannot apply (a month that is not YYYY-MM, a version that is not a number)."""


@dataclass(frozen=True)
class Filters:
    model: str = ""
    version: str = ""
    region: str = ""
    month_from: str = ""  # YYYY-MM, inclusive
    month_to: str = ""

    @classmethod
    def parse(cls, get) -> "Filters":
        """From a query string; FilterError names the field and what it expects."""
        f = {k: (get.get(k) or "").strip()[:64] for k in ("model", "version", "region", "month_from", "month_to")}
        for k, v in f.items():
            # A NUL would make PostgreSQL's driver raise (a 500); no stored value holds one.
            if first_refused(v):
                raise FilterError(f"筛选条件 {k} 含有不允许的字符")
        for k in ("month_from", "month_to"):
            if f[k] and not MONTH_RE.match(f[k]):
                raise FilterError(f"月份格式应为 YYYY-MM：{f[k]!r}")
        if f["version"] and not (f["version"].isascii() and f["version"].isdigit()):
            raise FilterError(f"版本应为数字：{f['version']!r}")
        if f["month_from"] and f["month_to"] and f["month_from"] > f["month_to"]:
            raise FilterError("起始月份晚于截止月份")
        return cls(**f)


@dataclass(frozen=True)
class Figures:
    opened: int
    concluded: int
    confirmed: int
    precision: float | None
    recovered_wan: Decimal
    confirmed_amount: Decimal
    median_days: float | None
    repeat_subjects: int


@dataclass(frozen=True)
class Row:
    model: str
    version: str
    status: str
    region: str
    month: str
    figures: Figures

    @property
    def status_label(self) -> str:
        return MODEL_STATUS_LABELS.get(self.status, self.status)


def month_of(at: datetime) -> str:
    return timezone.localtime(at).strftime("%Y-%m")


def _month_start(month: str) -> datetime:
    y, m = int(month[:4]), int(month[5:])
    return timezone.make_aware(datetime.combine(date(y, m, 1), time.min))


def _next_month(month: str) -> str:
    y, m = int(month[:4]), int(month[5:])
    return f"{y + m // 12:04d}-{m % 12 + 1:02d}"


def _leads(f: Filters):
    qs = Lead.objects.filter(source=Source.MODEL.value)
    if f.model:
        qs = qs.filter(model=f.model)
    if f.version:
        qs = qs.filter(model_version=f.version)
    if f.region:
        qs = qs.filter(region=f.region)
    # Month bounds in the console's time zone, as month_of() labels them.
    if f.month_from:
        qs = qs.filter(created_at__gte=_month_start(f.month_from))
    if f.month_to:
        qs = qs.filter(created_at__lt=_month_start(_next_month(f.month_to)))
    return qs.only("id", "model", "model_version", "model_status", "region", "subject_kind", "subject_id",
                   "status", "cause", "amount", "repeat_count", "created_at", "closed_at")


def _recovered(lead_ids: list[int]) -> dict[int, Decimal]:
    money = [code for code, a in ACTIONS.items() if a.money]
    out: dict[int, Decimal] = defaultdict(Decimal)
    for i in range(0, len(lead_ids), 5000):  # bounded IN lists (SQLite's variable limit)
        for lead_id, amount in Action.objects.filter(lead_id__in=lead_ids[i:i + 5000], code__in=money) \
                .values_list("lead_id", "amount_wan"):
            out[lead_id] += amount or Decimal(0)
    return out


def measure(leads: list[Lead], recovered: dict[int, Decimal]) -> Figures:
    concluded = [ld for ld in leads if is_concluded(ld.status)]
    confirmed = [ld for ld in leads if is_confirmed(ld.status, ld.cause)]
    days = [(ld.closed_at - ld.created_at).total_seconds() / 86400 for ld in leads if ld.closed_at]
    return Figures(
        opened=len(leads), concluded=len(concluded), confirmed=len(confirmed),
        precision=len(confirmed) / len(concluded) if concluded else None,
        recovered_wan=sum((recovered.get(ld.id, Decimal(0)) for ld in leads), Decimal(0)),
        confirmed_amount=sum((ld.amount or Decimal(0) for ld in confirmed), Decimal(0)),
        median_days=round(statistics.median(days), 1) if days else None,
        repeat_subjects=len({(ld.subject_kind, ld.subject_id) for ld in leads if ld.repeat_count > 0}))


@dataclass(frozen=True)
class Effectiveness:
    rows: list[Row]
    production: Figures  # every non-pilot row together (在用, and 停用 versions' older leads)
    pilot: Figures       # the pilots', counted apart


def compute(f: Filters = Filters()) -> Effectiveness:
    leads = list(_leads(f))
    recovered = _recovered([ld.id for ld in leads])
    groups: dict[tuple[str, str, str, str, str], list[Lead]] = defaultdict(list)
    for ld in leads:
        groups[(ld.model, ld.model_version, ld.model_status, ld.region, month_of(ld.created_at))].append(ld)
    rows = [Row(*key, figures=measure(group, recovered)) for key, group in sorted(groups.items())]
    return Effectiveness(rows, measure([ld for ld in leads if ld.model_status != PILOT], recovered),
                         measure([ld for ld in leads if ld.model_status == PILOT], recovered))


# --- exports ---------------------------------------------------------------------------------

HEADERS = ("模型", "版本", "模型状态", "统筹区", "月份", "立案线索数", "已查结数", "查证属实数", "查证属实率",
           "追回金额（万元）", "查实金额（元）", "办结天数中位数", "屡次出现主体数")


def table(eff: Effectiveness) -> list[list]:
    """The export's rows (numbers as numbers; the page shows the same figures)."""
    def cells(fig: Figures) -> list:
        return [fig.opened, fig.concluded, fig.confirmed,
                round(fig.precision, 4) if fig.precision is not None else None,
                float(fig.recovered_wan), float(fig.confirmed_amount), fig.median_days, fig.repeat_subjects]
    out = [[r.model, r.version, r.status_label, r.region, r.month] + cells(r.figures) for r in eff.rows]
    out.append(["在用合计", "", "", "", ""] + cells(eff.production))
    out.append(["试点合计（另计）", "", "", "", ""] + cells(eff.pilot))
    return out


def to_csv(eff: Effectiveness) -> bytes:
    """UTF-8 with a byte-order mark (spreadsheets then read the Chinese headers); every text cell
    neutralised (a model or region name never becomes a formula)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(HEADERS)
    for row in table(eff):
        w.writerow(neutralise_row("" if v is None else v for v in row))
    return buf.getvalue().encode("utf-8-sig")


def to_xlsx(eff: Effectiveness, title: str) -> bytes:
    from openpyxl import Workbook

    from .report import fixed_zip, safe_row
    wb = Workbook()
    ws = wb.active
    ws.title = "模型成效"
    ws.append(safe_row([title]))
    ws.append(safe_row(list(HEADERS)))
    for row in table(eff):
        ws.append(safe_row(row))
    wb.properties.creator = "tracecode console"
    wb.properties.created = wb.properties.modified = datetime(2024, 1, 1)
    buf = io.BytesIO()
    wb.save(buf)
    return fixed_zip(buf.getvalue())


# --- charts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    width: int  # px of BAR_WIDTH
    text: str


BAR_WIDTH = 240


def bars(items: Iterable[tuple[str, float, str]], scale: float | None = None) -> list[Bar]:
    """Horizontal bars drawn as inline SVG by the template (no script, no library): each value's
    width relative to `scale` (or the largest value)."""
    items = list(items)
    top = scale if scale is not None else max((v for _, v, _ in items), default=0)
    return [Bar(label, v, int(round(BAR_WIDTH * v / top)) if top > 0 else 0, text) for label, v, text in items]


def by_model(eff: Effectiveness) -> list[tuple[str, Figures]]:
    """Per model, version and status over the filtered months and regions: the charts' groups."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in eff.rows:
        groups[f"{r.model} v{r.version}（{r.status_label}）"].append(r)
    out = []
    for label, rows in sorted(groups.items()):
        concluded = sum(r.figures.concluded for r in rows)
        confirmed = sum(r.figures.confirmed for r in rows)
        out.append((label, Figures(
            opened=sum(r.figures.opened for r in rows), concluded=concluded, confirmed=confirmed,
            precision=confirmed / concluded if concluded else None,
            recovered_wan=sum((r.figures.recovered_wan for r in rows), Decimal(0)),
            confirmed_amount=sum((r.figures.confirmed_amount for r in rows), Decimal(0)),
            median_days=None, repeat_subjects=0)))  # medians and distinct subjects do not add up
    return out


# --- Prometheus ----------------------------------------------------------------------------------

# name suffix -> (help, the figure). Labels: model, version, status, region, month; month only
# the current and the previous one, so the series stay bounded by models x versions x regions x 2.
GAUGES = {
    "opened": ("Leads the model opened in the month", lambda f: f.opened),
    "concluded": ("Of them, concluded (查证属实 or 查证不属实)", lambda f: f.concluded),
    "confirmed": ("Of them, confirmed (查证属实; technical causes count as unfounded)", lambda f: f.confirmed),
    "precision": ("Confirmed / concluded (absent until one is concluded)", lambda f: f.precision),
    "recovered_wan": ("Amounts recovered by actions on them, 万元", lambda f: float(f.recovered_wan)),
    "confirmed_amount_yuan": ("Amounts of the confirmed leads, yuan", lambda f: float(f.confirmed_amount)),
    "median_days_to_close": ("Median days from opening to closing (absent until one is closed)",
                             lambda f: f.median_days),
    "repeat_subjects": ("Distinct subjects seen in earlier leads", lambda f: f.repeat_subjects),
}
LABELS = ("model", "version", "status", "region", "month")


def metric_months(today: date | None = None) -> tuple[str, str]:
    """The current month and the previous one, in the console's time zone."""
    today = today or timezone.localdate()
    prev = date(today.year - (today.month == 1), (today.month - 2) % 12 + 1, 1)
    return prev.strftime("%Y-%m"), today.strftime("%Y-%m")


class Collector:
    """Reads the ledger at every scrape (prometheus_client's custom-collector protocol), so the
    exporter holds no state of its own and is never behind the ledger."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        prev, cur = metric_months()
        eff = compute(Filters(month_from=prev, month_to=cur))
        families = {k: GaugeMetricFamily(f"tracecode_console_model_{k}", h, labels=LABELS) for k, (h, _) in GAUGES.items()}
        for r in eff.rows:
            for k, (_, get) in GAUGES.items():
                v = get(r.figures)
                if v is not None:
                    families[k].add_metric([r.model, r.version, r.status, r.region, r.month], v)
        yield from families.values()
