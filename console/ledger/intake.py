"""Leads into the ledger: the leads engine's files, handed-down batches and complaints (CSV or
XLSX), live DUPLICATEs from the audit stream, the site registry. Every path is idempotent: an
arrival has a key (Hit.external, Evidence.key) and a second arrival of the same key changes
nothing. A new hit on a subject that has an open lead is added to it as evidence; only when the
subject has no open lead is a new lead opened (Lead.lock_key, unique among open leads).

Insured ids: a value that is not already a pseudonym is turned into one here, before anything is
stored; the raw id is never written anywhere.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Iterable, Iterator
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Max, Min, Sum

from tracecode.server.pseudonym import Pseudonymizer, generate_key_file

from .models import Batch, Entry, Evidence, Hit, Lead, Site
from .rules import HANDED_DOWN, LIVE_MODEL, OPEN_STATUSES, RISK_ORDER, Source

log = logging.getLogger("tracecode.console.intake")
SYSTEM = "system:intake"


# --- pseudonyms ----------------------------------------------------------------------------

_pseudonymizer: Pseudonymizer | None = None


def pseudonymizer() -> Pseudonymizer:
    """The deployment's Pseudonymizer (settings.PSEUDONYM_KEY_FILE). On a machine with no key
    file yet (a first `tracecode console` on SQLite) one is generated, with a warning: a real
    deployment points the setting at the key the server and the leads engine use."""
    global _pseudonymizer
    if _pseudonymizer is None:
        path = settings.PSEUDONYM_KEY_FILE
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            generate_key_file(path)
            log.warning("no pseudonym key at %s: generated a new one (set TRACECODE_PSEUDONYM_KEY_FILE "
                        "to the deployment's key so pseudonyms match the server's)", path)
        _pseudonymizer = Pseudonymizer.from_file(path)
    return _pseudonymizer


def as_pseudonym(value: str) -> str:
    """A pseudonym as it is, anything else (a raw id) turned into one."""
    value = (value or "").strip()
    if not value or Pseudonymizer.looks_like_pseudonym(value):
        return value
    return pseudonymizer().pseudonym(value)


# --- reports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    source: str
    line: int
    field: str
    reason: str

    def __str__(self):
        return f"{self.source}:{self.line}: {self.field}: {self.reason}"


@dataclass
class ImportReport:
    leads_created: int = 0
    leads_extended: int = 0      # existing open leads that got new evidence or hits
    evidence_added: int = 0
    unchanged: int = 0           # rows already in the ledger
    problems: list[RowProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# --- file reading --------------------------------------------------------------------------

# Column names a handed-down sheet may use (the bureau's sheets are in Chinese) -> field.
BATCH_ALIASES = {
    "subject_id": "subject_id", "对象编码": "subject_id", "机构编码": "subject_id", "定点医药机构编码": "subject_id",
    "site_id": "subject_id",
    "subject_kind": "subject_kind", "对象类型": "subject_kind",
    "insured_id": "insured_id", "参保人证件号": "insured_id", "身份证号": "insured_id", "参保人编号": "insured_id",
    "description": "description", "线索描述": "description", "问题描述": "description", "线索内容": "description",
    "region": "region", "统筹区": "region", "区划": "region",
    "name": "name", "对象名称": "name", "机构名称": "name",
}
SUBJECT_KIND_ALIASES = {"SITE": "SITE", "机构": "SITE", "定点医药机构": "SITE", "定点药店": "SITE",
                        "定点医疗机构": "SITE", "INSURED": "INSURED", "参保人": "INSURED", "参保人员": "INSURED"}


def _rows(path: str, data: bytes | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, fields) of a CSV (UTF-8, BOM allowed), XLSX (first sheet) or Parquet file."""
    name = path.lower()
    if name.endswith(".xlsx"):
        from openpyxl import load_workbook
        wb = load_workbook(io.BytesIO(data) if data is not None else path, read_only=True, data_only=True)
        rows = wb.worksheets[0].iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        for i, values in enumerate(rows, start=2):
            if values is None or all(v is None or str(v).strip() == "" for v in values):
                continue
            yield i, {h: ("" if v is None else _cell(v)) for h, v in zip(header, values) if h}
        return
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(io.BytesIO(data) if data is not None else path)
        for i, rec in enumerate(table.to_pylist(), start=2):
            yield i, {k: "" if v is None else (v.isoformat() if isinstance(v, datetime) else str(v))
                      for k, v in rec.items()}
        return
    text = data.decode("utf-8-sig") if data is not None else open(path, encoding="utf-8-sig", newline="").read()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for rec in reader:
        yield reader.line_num, {k.strip(): (v or "").strip() for k, v in rec.items() if k}


def _cell(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # ids typed as numbers in a sheet (leading zeros are already lost there)
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return str(v).strip()


def _ts(text: str) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return t


def _float(text: str) -> float | None:
    """A score: a number, `inf` (ABNORMAL_SITE's +inf when MAD and mean deviation are 0), or empty."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _dec(text: str) -> Decimal | None:
    if text in ("", None):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None


# --- the one-open-lead rule ----------------------------------------------------------------


@dataclass(frozen=True)
class LeadFacts:
    """What an arrival says about its lead (the columns of leads.md)."""
    source: Source
    model: str
    subject_kind: str
    subject_id: str
    region: str = ""
    model_version: str = ""
    score: float | None = None
    risk: str = ""
    summary: str = ""
    batch: Batch | None = None
    packs: int = 0
    lines: int = 0
    amount: Decimal | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None

    @property
    def lock_key(self) -> str:
        if self.source in HANDED_DOWN:
            if self.batch is None:
                raise ValueError("a handed-down lead comes with its batch")
            return f"{self.source.value}|{self.batch.number}|{self.subject_kind}|{self.subject_id}"
        return f"{self.model}|{self.subject_kind}|{self.subject_id}"


def _open_lead(facts: LeadFacts) -> tuple[Lead, bool]:
    """The open lead of the subject, locked, or a new one (and whether it is new)."""
    open_values = [s.value for s in OPEN_STATUSES]
    for _ in range(3):
        lead = (Lead.objects.select_for_update().filter(lock_key=facts.lock_key, status__in=open_values).first())
        if lead is not None:
            return lead, False
        # Earlier leads on the subject, under any model or source: a repeat (屡次出现) ranks first.
        repeats = Lead.objects.filter(subject_kind=facts.subject_kind, subject_id=facts.subject_id).count()
        try:
            with transaction.atomic():  # a racing intake may open the same lead: the constraint decides
                lead = Lead.objects.create(
                    ref=f"tmp-{os.urandom(8).hex()}", lock_key=facts.lock_key, source=facts.source.value,
                    batch=facts.batch, model=facts.model, model_version=facts.model_version,
                    subject_kind=facts.subject_kind, subject_id=facts.subject_id, region=facts.region,
                    score=facts.score, risk=facts.risk, summary=facts.summary, packs=facts.packs,
                    lines=facts.lines, amount=facts.amount, window_start=facts.window_start,
                    window_end=facts.window_end, repeat_count=repeats)
                lead.ref = f"L{lead.pk:08d}"
                lead.save(update_fields=["ref"])
        except IntegrityError:
            continue
        Entry.objects.create(lead=lead, actor=SYSTEM, kind="CREATED", field="status", after=lead.status,
                             reason=f"{facts.source.value} {facts.model}" + (f"（屡次出现第 {repeats + 1} 次）" if repeats else ""))
        return lead, True
    raise RuntimeError(f"could not open a lead for {facts.lock_key}")


def _hit(lead: Lead, external: str, facts: LeadFacts, description: str = "") -> Hit:
    hit, _ = Hit.objects.get_or_create(key=f"{external}@{lead.ref}", defaults=dict(
        external=external, lead=lead, source=facts.source.value, batch=facts.batch, description=description))
    return hit


def _refresh_figures(lead: Lead, facts: LeadFacts, new_lines: int) -> None:
    """A lead's figures from its evidence (or the arrival's, when it brought none), the risk and
    score the highest seen; an entry records what the arrival added."""
    agg = lead.evidence.aggregate(lo=Min("settled_at"), hi=Max("settled_at"), amount=Sum("amount"))
    n = lead.evidence.count()
    if n:
        lead.lines = n
        lead.packs = lead.evidence.exclude(canonical_code="").values("canonical_code").distinct().count()
        lead.window_start, lead.window_end = agg["lo"], agg["hi"]
        later = lead.evidence.filter(role="later").aggregate(s=Sum("amount"))["s"]
        lead.amount = later if lead.evidence.filter(role="later").exists() else agg["amount"]
    else:
        lead.lines, lead.packs = max(lead.lines, facts.lines), max(lead.packs, facts.packs)
        lead.amount = facts.amount if facts.amount is not None else lead.amount
        lead.window_start = min(filter(None, [lead.window_start, facts.window_start]), default=None)
        lead.window_end = max(filter(None, [lead.window_end, facts.window_end]), default=None)
    if facts.score is not None and (lead.score is None or facts.score > lead.score):
        lead.score = facts.score
    if facts.risk and RISK_ORDER.get(facts.risk, 3) < RISK_ORDER.get(lead.risk, 3):
        lead.risk = facts.risk
    if facts.summary:
        lead.summary = facts.summary
    if not lead.region and facts.region:
        lead.region = facts.region
    lead.save()
    if new_lines:
        Entry.objects.create(lead=lead, actor=SYSTEM, kind="EVIDENCE", field="lines", after=str(lead.lines),
                             reason=f"新增证据 {new_lines} 条")


@dataclass(frozen=True)
class EvidenceLine:
    key: str
    role: str
    site_id: str
    settlement_id: str = ""
    line_no: int | None = None
    settled_at: datetime | None = None
    canonical_code: str = ""
    product_id: str = ""
    insured_pseudonym: str = ""
    amount: Decimal | None = None
    first_site_id: str = ""


def arrive(facts: LeadFacts, external: str, lines: list[EvidenceLine], report: ImportReport,
            description: str = "") -> Lead | None:
    """One arrival (a lead row with its evidence, a batch row, a live event), in one transaction."""
    with transaction.atomic():
        known = set(Evidence.objects.filter(key__in=[e.key for e in lines]).values_list("key", flat=True))
        fresh = [e for e in lines if e.key not in known]
        seen = Hit.objects.filter(external=external).exists()
        if seen and not fresh:
            report.unchanged += 1
            return None
        lead, created = _open_lead(facts)
        hit = _hit(lead, external, facts, description)
        for e in fresh:
            Evidence.objects.create(lead=lead, hit=hit, **e.__dict__)
        _refresh_figures(lead, facts, len(fresh) if not created else 0)
        report.evidence_added += len(fresh)
        if created:
            report.leads_created += 1
        else:
            report.leads_extended += 1
            if not fresh:
                Entry.objects.create(lead=lead, actor=SYSTEM, kind="HIT", field="hits", after=external,
                                     reason=description or "同一对象的新线索并入本线索")
        return lead


# --- the leads engine's files --------------------------------------------------------------

LEAD_REQUIRED = ("lead_id", "model", "subject_kind", "subject_id")
EVIDENCE_REQUIRED = ("lead_id", "role", "site_id")


def import_engine(leads_path: str, evidence_path: str | None = None, *, leads_data: bytes | None = None,
                  evidence_data: bytes | None = None) -> ImportReport:
    """The engine's `leads` (+ `evidence`) files, CSV or Parquet. Importing them twice changes nothing."""
    report = ImportReport()
    evidence: dict[str, list[EvidenceLine]] = {}
    if evidence_path:
        src = os.path.basename(evidence_path)
        for line, f in _rows(evidence_path, evidence_data):
            missing = [k for k in EVIDENCE_REQUIRED if not f.get(k)]
            if missing:
                report.problems.append(RowProblem(src, line, missing[0], "required"))
                continue
            try:
                ev = EvidenceLine(
                    key="|".join(["MODEL", f["lead_id"], f["role"], f["site_id"], f.get("settlement_id", ""),
                                  f.get("line_no", ""), f.get("canonical_code", "")]),
                    role=f["role"], site_id=f["site_id"], settlement_id=f.get("settlement_id", ""),
                    line_no=int(f["line_no"]) if f.get("line_no") else None, settled_at=_ts(f.get("settled_at", "")),
                    canonical_code=f.get("canonical_code", ""), product_id=f.get("product_id", ""),
                    insured_pseudonym=as_pseudonym(f.get("insured_id", "")), amount=_dec(f.get("amount", "")))
            except ValueError as exc:
                report.problems.append(RowProblem(src, line, "settled_at/line_no/amount", str(exc)))
                continue
            evidence.setdefault(f["lead_id"], []).append(ev)
    src = os.path.basename(leads_path)
    seen_ids = set()
    for line, f in _rows(leads_path, leads_data):
        missing = [k for k in LEAD_REQUIRED if not f.get(k)]
        if missing:
            report.problems.append(RowProblem(src, line, missing[0], "required"))
            continue
        kind = f["subject_kind"].upper()
        if kind not in ("SITE", "INSURED", "RING"):
            report.problems.append(RowProblem(src, line, "subject_kind", f"{f['subject_kind']!r}: SITE, INSURED or RING"))
            continue
        try:
            facts = LeadFacts(
                source=Source.MODEL, model=f["model"], model_version=f.get("model_version", ""), subject_kind=kind,
                subject_id=as_pseudonym(f["subject_id"]) if kind == "INSURED" else f["subject_id"],
                region=f.get("region", ""), score=_float(f.get("score", "")),
                risk=f.get("risk", "").upper(), summary=f.get("summary", ""),
                packs=int(f.get("packs") or 0), lines=int(f.get("lines") or 0), amount=_dec(f.get("amount", "")),
                window_start=_ts(f.get("window_start", "")), window_end=_ts(f.get("window_end", "")))
        except ValueError as exc:
            report.problems.append(RowProblem(src, line, "score/packs/lines/amount/window", str(exc)))
            continue
        seen_ids.add(f["lead_id"])
        arrive(facts, f"MODEL:{f['lead_id']}", evidence.get(f["lead_id"], []), report)
    for orphan in sorted(set(evidence) - seen_ids):
        report.warnings.append(f"evidence for lead_id {orphan} not in {src}: not imported")
    return report


# --- handed-down batches and complaints ----------------------------------------------------


def import_batch(path: str, source: Source, number: str, received_on: date, *, data: bytes | None = None,
                 user=None) -> ImportReport:
    """A batch (国家局/省局移交, 举报投诉): rows of subject and description, CSV or XLSX.
    The same batch (source, number) imported twice changes nothing; a batch number seen before
    with another date is refused."""
    if source not in HANDED_DOWN:
        raise ValueError(f"source {source.value}: a batch is NATIONAL, PROVINCIAL or COMPLAINT")
    number = number.strip()
    if not number:
        raise ValueError("batch number is required")
    report = ImportReport()
    batch, created = Batch.objects.get_or_create(source=source.value, number=number,
                                                 defaults={"received_on": received_on, "imported_by": user})
    if not created and batch.received_on != received_on:
        raise ValueError(f"batch {number} of {source.value} was received on {batch.received_on}, not {received_on}")
    src = os.path.basename(path)
    unknown: set[str] = set()
    for line, raw in _rows(path, data):
        f: dict[str, str] = {}
        for k, v in raw.items():
            if k in BATCH_ALIASES:
                f[BATCH_ALIASES[k]] = v
            else:
                unknown.add(k)
        named = f.get("subject_kind") or ("INSURED" if f.get("insured_id") else "SITE")
        kind = SUBJECT_KIND_ALIASES.get(named.upper() if named.isascii() else named)
        if kind is None:
            report.problems.append(RowProblem(src, line, "subject_kind", f"{f.get('subject_kind')!r}: SITE or INSURED"))
            continue
        subject = as_pseudonym(f.get("insured_id") or f.get("subject_id", "")) if kind == "INSURED" else f.get("subject_id", "")
        if not subject:
            report.problems.append(RowProblem(src, line, "subject_id" if kind == "SITE" else "insured_id", "required"))
            continue
        description = f.get("description", "")
        region = f.get("region", "") or (Site.objects.filter(site_id=subject).values_list("region", flat=True).first() or "")
        facts = LeadFacts(source=source, model=source.value, subject_kind=kind, subject_id=subject, region=region,
                          batch=batch, summary=description)
        digest = hashlib.sha256(f"{kind}|{subject}|{description}".encode()).hexdigest()[:24]
        arrive(facts, f"{source.value}:{number}:{digest}", [], report, description)
    if unknown:
        report.warnings.append(f"{src}: unknown columns ignored: {', '.join(sorted(unknown))}")
    return report


# --- live DUPLICATEs from the audit stream -------------------------------------------------

SHANGHAI = ZoneInfo("Asia/Shanghai")


@dataclass(frozen=True)
class LiveDuplicate:
    """One DUPLICATE attempt from the settlement audit stream (an ATTEMPT entry, x=DUPLICATE)."""
    site_id: str
    settlement_id: str
    line_index: int
    canonical_code: str
    settled_at: datetime
    insured_pseudonym: str = ""

    @property
    def key(self) -> str:
        # The attempt's own identity, not the stream entry id: the same attempt seen again (a
        # replay, a redelivery after a crash) is the same evidence line.
        return f"LIVE|{self.site_id}|{self.settlement_id}|{self.line_index}|{self.canonical_code}"


def add_live(events: Iterable[LiveDuplicate], report: ImportReport | None = None) -> ImportReport:
    """Live DUPLICATEs -> evidence of the buying site's open LIVE lead, grouped (hits) per site and day."""
    report = report or ImportReport()
    for ev in events:
        day = ev.settled_at.astimezone(SHANGHAI).date()
        site = Site.objects.filter(site_id=ev.site_id).first()
        facts = LeadFacts(source=Source.LIVE, model=LIVE_MODEL, subject_kind="SITE", subject_id=ev.site_id,
                          region=site.region if site else "", risk="HIGH",
                          summary=f"实时监测：{ev.site_id} 结算了已在他处结算过的追溯码（重复结算）")
        line = EvidenceLine(key=ev.key, role="later", site_id=ev.site_id, settlement_id=ev.settlement_id,
                            line_no=ev.line_index + 1, settled_at=ev.settled_at, canonical_code=ev.canonical_code,
                            insured_pseudonym=ev.insured_pseudonym)
        arrive(facts, f"LIVE:{ev.site_id}:{day.isoformat()}", [line], report, f"{day.isoformat()} 实时重复结算")
    return report


# --- the site registry ---------------------------------------------------------------------


def import_sites(path: str, *, data: bytes | None = None) -> ImportReport:
    report = ImportReport()
    src = os.path.basename(path)
    for line, f in _rows(path, data):
        if not f.get("site_id"):
            report.problems.append(RowProblem(src, line, "site_id", "required"))
            continue
        kind = (f.get("site_kind") or "").upper()
        if kind not in ("", "PHARMACY", "INSTITUTION"):
            report.problems.append(RowProblem(src, line, "site_kind", f"{kind!r}: PHARMACY or INSTITUTION"))
            continue
        values = {"kind": kind, "region": f.get("region", ""), "name": f.get("name", "")}
        site, created = Site.objects.get_or_create(site_id=f["site_id"], defaults=values)
        if created:
            pass
        elif any(getattr(site, k) != v for k, v in values.items()):
            Site.objects.filter(pk=site.pk).update(**values)
        else:
            report.unchanged += 1
    return report
