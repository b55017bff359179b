"""The weekly report (打击欺诈骗保工作周报表), per region and week (Monday to Sunday, the
console's time zone), built from the ledger's actions, inspections and batches.

`build(region, week_start)` counts; `content_json` is the canonical JSON of a report (what a
snapshot freezes and hashes); `xlsx(content)` writes the bureau's layout from that content, so a
submitted report's spreadsheet is rebuilt byte-for-byte the same from its snapshot, whatever
happened in the ledger since.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Context, Decimal

from django.db import transaction
from django.utils import timezone

from tracecode.rules.cells import neutralise_row

from .models import Action, Inspection, Lead, ReportSnapshot, Site
from .rules import ACTION_TYPES, HANDED_DOWN, PILOT, SOURCE_LABELS, Party, Source, Status, is_confirmed

KINDS = ("INSTITUTION", "PHARMACY", "")  # 定点医疗机构, 定点药店, 类别不明
KIND_HEADERS = ("定点医疗机构", "定点药店", "类别不明")
MONEY = ("amount_wan", "monthly_turnover_wan", "violation_wan", "confiscated_wan")


def week_of(day: date) -> date:
    return day - timedelta(days=day.weekday())


_WIDE = Context(prec=400)


def _money(v) -> str:
    """万元 with two decimals. Wide context: a figure stored beyond its column (by hand, or before
    the forms checked it) is written as it is rather than breaking the report page."""
    d = v or Decimal(0)
    return str(d.quantize(Decimal("0.01"), context=_WIDE)) if d.is_finite() else str(d)


@dataclass
class InstitutionRow:
    code: str
    label: str
    counts: dict[str, int]                 # site kind -> distinct institutions
    money: dict[str, dict[str, str]]       # figure -> site kind -> 万元 (only the figures the row keeps)


@dataclass
class PersonRow:
    code: str
    label: str
    persons: int
    amount_wan: str | None = None


@dataclass
class BatchRow:
    source: str
    source_label: str
    number: str
    received_on: str
    received: int
    closed: int
    confirmed: int


@dataclass
class WeeklyReport:
    region: str
    week_start: str
    week_end: str
    institutions: list[InstitutionRow]
    institution_total: InstitutionRow
    remarks: dict[str, str]
    persons: list[PersonRow]
    person_total: PersonRow
    batches: list[BatchRow] = field(default_factory=list)
    pilot: dict = field(default_factory=dict)  # （附）试点模型线索, see _pilot


def build(region: str, week_start: date) -> dict:
    """The report's content (a JSON-ready dict) for a region and the week starting week_start."""
    week_start = week_of(week_start)
    week_end = week_start + timedelta(days=6)
    acts = list(Action.objects.filter(region=region, decided_on__gte=week_start, decided_on__lte=week_end)
                .select_related("lead"))

    inst_rows = []
    all_sites: dict[str, set[str]] = {k: set() for k in KINDS}
    totals = {f: {k: Decimal(0) for k in KINDS} for f in MONEY}
    for at in (a for a in ACTION_TYPES if a.party == Party.INSTITUTION):
        mine = [a for a in acts if a.code == at.code]
        counts = {k: len({a.subject_id for a in mine if a.site_kind == k}) for k in KINDS}
        figures = (["amount_wan"] if at.money else []) + (
            ["monthly_turnover_wan", "violation_wan", "confiscated_wan"] if at.reduced_loss else [])
        money: dict[str, dict[str, str]] = {}
        for f in figures:
            money[f] = {}
            for k in KINDS:
                s = sum((getattr(a, f) or Decimal(0) for a in mine if a.site_kind == k), Decimal(0))
                money[f][k] = _money(s)
                totals[f][k] += s
        for a in mine:
            all_sites[a.site_kind].add(a.subject_id)
        inst_rows.append(InstitutionRow(at.code, at.label, counts, money))
    inst_total = InstitutionRow("TOTAL", "合计（不重复数）", {k: len(v) for k, v in all_sites.items()},
                                {f: {k: _money(v) for k, v in totals[f].items()} for f in MONEY})

    inspections = Inspection.objects.filter(region=region, inspected_on__gte=week_start, inspected_on__lte=week_end)
    fund = sum((a.amount_wan or 0 for a in acts if a.code == "RECOVER_FUND"), Decimal(0))
    personal = sum((a.amount_wan or 0 for a in acts if a.code == "RECOVER_PATIENT"), Decimal(0))
    remarks = {
        "辖区定点医药机构数": str(Site.objects.filter(region=region).count()),
        "检查机构数": str(inspections.values("site_id").distinct().count()),
        "其中现场检查": str(inspections.filter(on_site=True).values("site_id").distinct().count()),
        "追回资金（万元）": _money(fund + personal),
        "其中追回医保基金（万元）": _money(fund),
        "其中为患者追回资金（万元）": _money(personal),
    }

    person_rows = []
    persons_all: set[str] = set()
    for at in (a for a in ACTION_TYPES if a.party == Party.PERSON):
        mine = [a for a in acts if a.code == at.code]
        who = {a.subject_id for a in mine}
        persons_all |= who
        amount = _money(sum((a.amount_wan or 0 for a in mine), Decimal(0))) if at.money else None
        person_rows.append(PersonRow(at.code, at.label, len(who), amount))
    person_total = PersonRow("TOTAL", "合计（不重复数）", len(persons_all),
                             _money(sum((a.amount_wan or 0 for a in acts if a.code == "P_RECOVER"), Decimal(0))))

    # （三）: every handed-down batch with leads in the region, as it stands at the week's end.
    end_at = timezone.make_aware(datetime.combine(week_end + timedelta(days=1), time.min))
    batch_rows = []
    leads = (Lead.objects.filter(region=region, source__in=[s.value for s in HANDED_DOWN], batch__isnull=False,
                                 batch__received_on__lte=week_end).select_related("batch"))
    by_batch: dict[int, list[Lead]] = {}
    for lead in leads:
        by_batch.setdefault(lead.batch_id, []).append(lead)
    for group in sorted(by_batch.values(), key=lambda g: (g[0].batch.received_on, g[0].batch.source, g[0].batch.number)):
        b = group[0].batch
        batch_rows.append(BatchRow(
            b.source, SOURCE_LABELS[Source(b.source)], b.number, b.received_on.isoformat(), len(group),
            sum(1 for lead in group if lead.status == Status.CLOSED.value and lead.closed_at and lead.closed_at < end_at),
            sum(1 for lead in group if is_confirmed(lead.status, lead.cause))))
    report = WeeklyReport(region, week_start.isoformat(), week_end.isoformat(), inst_rows, inst_total, remarks,
                          person_rows, person_total, batch_rows, _pilot(region, week_start, end_at, acts))
    return asdict(report)


def _pilot(region: str, week_start: date, end_at: datetime, acts: list[Action]) -> dict:
    """（附）试点模型线索, beside the bureau's three parts and never inside them (docs/console.md):
    the pilot leads opened in the week, and the part of the week's actions (already counted in
    （一）（二）, because the action was taken whatever found the subject) taken on pilot leads.
    The bureau's parts count no model lead at all ((三) is handed-down batches only), so a pilot
    can add no lead to them."""
    start_at = timezone.make_aware(datetime.combine(week_start, time.min))
    mine = [a for a in acts if a.lead.model_status == PILOT]
    money = {a.code for a in ACTION_TYPES if a.money}
    return {
        "leads_opened": Lead.objects.filter(region=region, source=Source.MODEL.value, model_status=PILOT,
                                            created_at__gte=start_at, created_at__lt=end_at).count(),
        "institutions": len({a.subject_id for a in mine if a.party == Party.INSTITUTION.value}),
        "persons": len({a.subject_id for a in mine if a.party == Party.PERSON.value}),
        "recovered_wan": _money(sum((a.amount_wan or Decimal(0) for a in mine if a.code in money), Decimal(0))),
    }


def content_json(content: dict) -> str:
    return json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def sha256(content: dict) -> str:
    return hashlib.sha256(content_json(content).encode("utf-8")).hexdigest()


@transaction.atomic
def submit(region: str, week_start: date, user) -> ReportSnapshot:
    """Freeze the report as sent. A week's report is submitted once; later ledger changes do not alter it."""
    from .roles import has
    from .rules import Perm
    from .workflow import Forbidden, RuleError
    if not has(user, Perm.SUBMIT_REPORT):
        raise Forbidden("无权限报送周报表")
    week_start = week_of(week_start)
    existing = ReportSnapshot.objects.filter(region=region, week_start=week_start).first()
    if existing:
        raise RuleError(f"{region} {week_start} 周报表已于 {existing.submitted_at:%Y-%m-%d %H:%M} 报送")
    content = build(region, week_start)
    return ReportSnapshot.objects.create(region=region, week_start=week_start, content=content_json(content),
                                         sha256=sha256(content), submitted_by=user.username)


def snapshot_content(snap: ReportSnapshot) -> dict:
    """The frozen content; ValueError when it does not match its hash (or is not JSON at all):
    a snapshot changed behind the ledger's back is never served as what was submitted."""
    try:
        content = json.loads(snap.content)
    except ValueError:
        raise ValueError(f"report snapshot {snap.pk}: content is not JSON") from None
    if not isinstance(content, dict) or sha256(content) != snap.sha256:
        raise ValueError(f"report snapshot {snap.pk}: content does not match its hash")
    return content


def snapshot_intact(snap: ReportSnapshot) -> bool:
    try:
        snapshot_content(snap)
    except ValueError:
        return False
    return True


# --- the spreadsheet -----------------------------------------------------------------------

SHEET_TITLES = ("（一）定点服务机构", "（二）参保人员", "（三）线索办理情况")
FIGURE_HEADERS = {"amount_wan": "金额（万元）", "monthly_turnover_wan": "月营业额（万元）",
                  "violation_wan": "违规额（万元）", "confiscated_wan": "罚没额（万元）"}


def safe_row(row: list) -> list:
    """A row as the spreadsheet gets it: text that a spreadsheet would run as a formula
    (`=HYPERLINK(...)` in a batch number) neutralised by a leading apostrophe, so openpyxl
    writes it as a string cell (data_type 's'); characters XML cannot hold dropped (openpyxl
    would refuse the whole workbook). Numbers stay numbers."""
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    return neutralise_row(ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v for v in row)


def xlsx(content: dict, *, sha: str = "") -> bytes:
    """The workbook of a report's content; every row goes through safe_row (nothing the ledger
    holds becomes a formula)."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    wb = Workbook()
    bold = Font(bold=True)
    center = Alignment(horizontal="center", vertical="center", wrap_text=True)
    title = f"打击欺诈骗保工作周报表（{content['region']}，{content['week_start']} 至 {content['week_end']}）"

    # （一）
    ws = wb.active
    ws.title = SHEET_TITLES[0]
    ws.append(safe_row([title]))
    ws.append(safe_row(["序号", "处理类型"] + [f"{h}（家）" for h in KIND_HEADERS]
              + [f"{FIGURE_HEADERS[f]}·{h}" for f in MONEY for h in KIND_HEADERS]))
    rows = content["institutions"] + [content["institution_total"]]
    for i, row in enumerate(rows, start=1):
        money = [row["money"].get(f, {}).get(k, "") for f in MONEY for k in KINDS]
        ws.append(safe_row([i if row["code"] != "TOTAL" else "", row["label"]] + [row["counts"][k] for k in KINDS]
                  + [float(m) if m != "" else None for m in money]))
    ws.append(safe_row([]))
    ws.append(safe_row(["备注"]))
    for k, v in content["remarks"].items():
        ws.append(safe_row([k, float(v) if "." in v else int(v)]))

    # （二）
    ws2 = wb.create_sheet(SHEET_TITLES[1])
    ws2.append(safe_row([title]))
    ws2.append(safe_row(["序号", "处理类型", "人数（人）", "金额（万元）"]))
    for i, row in enumerate(content["persons"] + [content["person_total"]], start=1):
        ws2.append(safe_row([i if row["code"] != "TOTAL" else "", row["label"], row["persons"],
                    float(row["amount_wan"]) if row["amount_wan"] is not None else None]))

    # （三）
    ws3 = wb.create_sheet(SHEET_TITLES[2])
    ws3.append(safe_row([title]))
    ws3.append(safe_row(["序号", "线索来源", "批次", "移交日期", "移交总数", "已办结数量", "查证属实线索数量"]))
    for i, b in enumerate(content["batches"], start=1):
        ws3.append(safe_row([i, b["source_label"], b["number"], b["received_on"], b["received"], b["closed"], b["confirmed"]]))
    tot = ["", "合计", "", "", sum(b["received"] for b in content["batches"]),
           sum(b["closed"] for b in content["batches"]), sum(b["confirmed"] for b in content["batches"])]
    ws3.append(safe_row(tot))

    for sheet in wb.worksheets:
        sheet["A1"].font = Font(bold=True, size=13)
        for cell in sheet[2]:
            cell.font, cell.alignment = bold, center
        for col in range(1, sheet.max_column + 1):
            sheet.column_dimensions[get_column_letter(col)].width = 16 if col > 1 else 6
        if sha:
            sheet.append(safe_row([]))
            sheet.append(safe_row([f"报送快照 SHA-256：{sha}"]))
    # Fixed document properties: the same content gives the same bytes.
    wb.properties.creator = "tracecode console"
    wb.properties.created = wb.properties.modified = datetime(2024, 1, 1)
    buf = io.BytesIO()
    wb.save(buf)
    return fixed_zip(buf.getvalue())


_ZIP_TIME = (2024, 1, 1, 0, 0, 0)


def fixed_zip(data: bytes) -> bytes:
    """The same workbook with every zip entry dated alike: openpyxl stamps entries with the time
    of writing, which would make a frozen report's file differ from one download to the next."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename == "docProps/core.xml":  # openpyxl sets "modified" to now on every save
                body = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*(</dcterms:modified>)", rb"\g<1>2024-01-01T00:00:00Z\g<2>", body)
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=_ZIP_TIME), body, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()
