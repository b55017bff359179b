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
import math
import os
import threading
import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Context, Decimal, InvalidOperation
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import Max, Min, Sum

from tracecode.rules.cells import restore
from tracecode.rules.insured import InsuredIdError
from tracecode.rules.insured import check as check_insured_id
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file
from tracecode.rules.text import REFUSED_CATEGORIES, text_problem

from .models import Batch, Entry, Evidence, Hit, Lead, Site
from .rules import DEFAULT_MODEL_STATUS, HANDED_DOWN, LIVE_MODEL, MODEL_STATUS_LABELS, OPEN_STATUSES, RISK_ORDER, Source

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
    """A pseudonym as it is, anything else (a raw id) checked (tracecode.rules.insured: NFKC,
    spaces, zero-width characters and dashes removed, upper-cased, the GB 11643 check character)
    and turned into one; '' for an id that is absent (empty, only spaces). Raises InsuredIdError,
    whose message names the rule and never the id, for an id that matches no documented format:
    another spelling of a person must not become another person."""
    value = (value or "").strip()
    if not value or Pseudonymizer.looks_like_pseudonym(value):
        return value
    norm = check_insured_id(value)
    return pseudonymizer().pseudonym(norm) if norm else ""


# --- reports -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    """What is wrong where: file, line (0: the file as a whole), field. The reason never holds a
    raw insured id (InsuredIdError names the rule only) and quotes other values only shortened."""
    source: str
    line: int
    field: str
    reason: str

    def __str__(self):
        return f"{self.source}:{self.line}: {self.field}: {self.reason}" if self.line else \
            f"{self.source}: {self.field}: {self.reason}"


class ImportRefused(Exception):
    """A problem found while writing (a lead's figures out of range once evidence is added):
    raised inside the import's transaction so that nothing of the file is kept."""

    def __init__(self, problem: RowProblem):
        super().__init__(str(problem))
        self.problem = problem


@dataclass
class ImportReport:
    leads_created: int = 0
    leads_extended: int = 0      # existing open leads that got new evidence or hits
    evidence_added: int = 0
    unchanged: int = 0           # rows already in the ledger
    problems: list[RowProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        """A file with any problem is imported not at all (all-or-nothing per file)."""
        return bool(self.problems)


def _refused(problems: list[RowProblem], warnings: list[str] | None = None) -> ImportReport:
    return ImportReport(problems=problems, warnings=warnings or [])


# --- limits --------------------------------------------------------------------------------

def max_bytes() -> int:
    """The largest file an import reads (settings.TRACECODE_IMPORT_MAX_BYTES)."""
    return int(getattr(settings, "TRACECODE_IMPORT_MAX_BYTES", 20 * 1024 * 1024))


# The most data rows one file may hold, per kind of file: one import is one transaction in one
# request, so its size is bounded. A batch row costs a lead (about 3 ms on SQLite: 3,000 rows
# took 9 s), so batches are capped lowest; the registry and the engine's files are larger by nature.
ROW_CAPS = {"batch": ("TRACECODE_IMPORT_MAX_ROWS", 1000), "sites": ("TRACECODE_IMPORT_MAX_ROWS_SITES", 20000),
            "engine": ("TRACECODE_IMPORT_MAX_ROWS_ENGINE", 20000)}


def max_rows(kind: str) -> int:
    name, default = ROW_CAPS[kind]
    return int(getattr(settings, name, default))


def max_text() -> int:
    """The longest free text (summary, description) a row may carry."""
    return int(getattr(settings, "TRACECODE_IMPORT_MAX_TEXT", 20000))


# Ids that become parts of other keys: Hit.external is "MODEL:<lead_id>" (300) and Hit.key adds "@<ref>".
LEAD_ID_MAX = 200


def _show(value: str, n: int = 24) -> str:
    """A value quoted in an error, shortened (the message must stay a message)."""
    return repr(value if len(value) <= n else value[:n] + "…")


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

# csv.field_size_limit is process-wide: raised only while the console reads a file (so that an
# over-long field is named by its column below, not lost in a csv.Error), under this lock.
_CSV_LIMIT = threading.Lock()


class FileUnreadable(Exception):
    """The file as a whole cannot be read (not a workbook, too big, too many rows, bad bytes)."""

    def __init__(self, line: int, reason: str, field_name: str = "file"):
        super().__init__(reason)
        self.line, self.reason, self.field = line, reason, field_name


def _read(path: str, data: Any = None, *, kind: str = "batch") -> list[tuple[int, dict[str, str]]]:
    """Every (line, fields) of a CSV (UTF-8, BOM allowed), XLSX (first sheet) or Parquet file
    (`data`: its bytes, an upload with .size and .read(), or None to read `path`),
    read whole before anything is written; FileUnreadable when the file is not what its name
    says, is over the size cap or holds more rows than the row cap."""
    # An upload's size is known before it is read (Django has it on disk or in memory already).
    size = os.path.getsize(path) if data is None else len(data) if isinstance(data, bytes) else data.size
    if size > max_bytes():
        raise FileUnreadable(0, f"{size} bytes, at most {max_bytes()} (TRACECODE_IMPORT_MAX_BYTES)")
    if data is None:
        with open(path, "rb") as fh:
            data = fh.read()
    elif not isinstance(data, bytes):
        data = data.read()
    cap = max_rows(kind)
    cap_name = ROW_CAPS[kind][0]
    out: list[tuple[int, dict[str, str]]] = []

    def add(line: int, rec: dict[str, str]) -> None:
        if len(out) >= cap:
            raise FileUnreadable(0, f"more than {cap} rows ({cap_name}): split the file")
        out.append((line, rec))

    name = path.lower()
    if name.endswith(".xlsx"):
        from openpyxl import load_workbook
        try:  # openpyxl raises a zoo (BadZipFile, KeyError, XML errors...) for what is not a workbook
            wb = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
            rows = wb.worksheets[0].iter_rows(values_only=True)
            header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
            for i, values in enumerate(rows, start=2):
                if values is None or all(v is None or str(v).strip() == "" for v in values):
                    continue
                add(i, {h: ("" if v is None else restore(_cell(v))) for h, v in zip(header, values) if h})
        except FileUnreadable:
            raise
        except Exception as exc:
            raise FileUnreadable(0, f"not an XLSX workbook ({type(exc).__name__})") from None
        return out
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # pyarrow's errors for what is not Parquet
            raise FileUnreadable(0, f"not a Parquet file ({type(exc).__name__})") from None
        if table.num_rows > cap:
            raise FileUnreadable(0, f"{table.num_rows} rows, at most {cap} ({cap_name}): split the file")
        for i, rec in enumerate(table.to_pylist(), start=2):
            add(i, {str(k): "" if v is None else (v.isoformat() if isinstance(v, (datetime, date)) else str(v))
                    for k, v in rec.items()})
        return out
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FileUnreadable(line, f"byte 0x{data[exc.start]:02X} is not UTF-8 (save the file as UTF-8)") from None
    with _CSV_LIMIT:
        old = csv.field_size_limit(max(max_bytes(), 131072))
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            for rec in reader:
                # restore: the engine's CSVs neutralise formula cells (rules/cells.py); undone here.
                add(reader.line_num, {k.strip(): restore((v or "").strip()) if isinstance(v, str) else ""
                                      for k, v in rec.items() if k})
        except csv.Error as exc:
            raise FileUnreadable(reader.line_num, f"not readable as CSV ({exc})") from None
        finally:
            csv.field_size_limit(old)
    return out


def _cell(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # ids typed as numbers in a sheet (leading zeros are already lost there)
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    return str(v).strip()


def _ts(text: str) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{_show(text)} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise ValueError(f"{_show(text)} has no UTC offset")
    return t


# --- row checks: the model's own limits ----------------------------------------------------

_WIDE = Context(prec=60)
_INT_MAX = 2**31 - 1  # IntegerField on PostgreSQL and the SQLite columns alike
_FREE_TEXT_ALLOWED = frozenset("\t\n\r")


def _free_text_problem(value: str, limit: int) -> str | None:
    """Summaries and descriptions: several lines are fine, other control and format characters
    (NUL, ESC, bidirectional overrides) are not."""
    if len(value) > limit:
        return f"{len(value)} characters, at most {limit}"
    if value.isascii() and value.isprintable():
        return None
    for i, ch in enumerate(value):
        if ch not in _FREE_TEXT_ALLOWED and unicodedata.category(ch) in REFUSED_CATEGORIES:
            return f"character U+{ord(ch):04X} at position {i + 1} is not allowed"
    return None


class _Row:
    """One row's fields checked against the columns they go to, before anything is written:
    every problem is recorded with file, line and field; the checked values are returned."""

    def __init__(self, src: str, line: int, fields: dict[str, str], problems: list[RowProblem]):
        self.src, self.line, self.f, self.problems = src, line, fields, problems
        self.ok = True

    def fail(self, name: str, reason: str) -> None:
        self.ok = False
        self.problems.append(RowProblem(self.src, self.line, name, reason))

    def text(self, name: str, model: type[models.Model], column: str, *, required: bool = False,
             limit: int | None = None) -> str:
        """An id-like text (no control or format characters) within its column's max_length."""
        value = self.f.get(name, "")
        if required and not value:
            self.fail(name, "required")
            return ""
        max_length = limit or model._meta.get_field(column).max_length
        problem = text_problem(value, max_length, name, required=False)
        if problem:
            self.fail(name, problem)
            return ""
        return value

    def free_text(self, name: str) -> str:
        value = self.f.get(name, "")
        problem = _free_text_problem(value, max_text())
        if problem:
            self.fail(name, problem)
            return ""
        return value

    def decimal(self, name: str, model: type[models.Model], column: str) -> Decimal | None:
        """A number that fits the DecimalField: finite, fewer integer digits than max_digits -
        decimal_places allows, no more decimal places than it keeps."""
        text = self.f.get(name, "")
        if not text:
            return None
        fld = model._meta.get_field(column)
        digits, places = fld.max_digits, fld.decimal_places
        try:
            d = Decimal(text)
        except (InvalidOperation, ValueError):
            self.fail(name, f"{_show(text)} is not a number")
            return None
        if not d.is_finite():
            self.fail(name, f"{_show(text)} is not a finite number")
            return None
        bound = Decimal(10) ** (digits - places)
        if abs(d) >= bound:
            self.fail(name, f"{_show(text)} is out of range (less than {bound} in absolute value)")
            return None
        if d != d.quantize(Decimal(1).scaleb(-places), context=_WIDE):
            self.fail(name, f"{_show(text)} has more than {places} decimal places")
            return None
        return d

    def integer(self, name: str, *, low: int = 0) -> int | None:
        text = self.f.get(name, "")
        if not text:
            return None
        try:
            n = int(text)
        except ValueError:
            self.fail(name, f"{_show(text)} is not a whole number")
            return None
        if not low <= n <= _INT_MAX:
            self.fail(name, f"{_show(text)} is out of range ({low} to {_INT_MAX})")
            return None
        return n

    def score(self, name: str) -> float | None:
        """A score: a finite number, or +inf (ABNORMAL_SITE's when MAD and mean deviation are 0)."""
        text = self.f.get(name, "")
        if not text:
            return None
        try:
            x = float(text)
        except ValueError:
            self.fail(name, f"{_show(text)} is not a number")
            return None
        if math.isnan(x) or x == -math.inf:
            self.fail(name, f"{_show(text)} is not a score (a number, or inf)")
            return None
        return x

    def time(self, name: str) -> datetime | None:
        try:
            return _ts(self.f.get(name, ""))
        except ValueError as exc:
            self.fail(name, str(exc))
            return None

    def insured(self, name: str, value: str) -> str:
        """The pseudonym of an insured id (a pseudonym kept as is); the error names the rule,
        never the id."""
        try:
            return as_pseudonym(value)
        except InsuredIdError as exc:
            self.fail(name, f"not a valid insured id: {exc.rule}")
            return ""


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
    model_status: str = DEFAULT_MODEL_STATUS
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
                    model_status=facts.model_status, subject_kind=facts.subject_kind, subject_id=facts.subject_id, region=facts.region,
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


_AMOUNT_BOUND = Decimal(10) ** (Lead._meta.get_field("amount").max_digits
                                 - Lead._meta.get_field("amount").decimal_places)


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
        if lead.amount is not None and abs(lead.amount) >= _AMOUNT_BOUND:
            # Each line fits its column, their sum may not: refuse rather than store what no page can show.
            raise ImportRefused(RowProblem(facts.subject_id if facts.subject_kind != "INSURED" else lead.ref, 0, "amount",
                                           f"the lead's evidence sums to more than {_AMOUNT_BOUND}"))
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
_EVIDENCE_KEY_MAX = Evidence._meta.get_field("key").max_length or 300


def _evidence_key(parts: list[str]) -> str:
    """The line's identity; a key longer than its column (long ids) is kept as its hash."""
    key = "|".join(parts)
    return key if len(key) <= _EVIDENCE_KEY_MAX else "MODELH|" + hashlib.sha256(key.encode()).hexdigest()


def _file_rows(src: str, path: str, data: Any, problems: list[RowProblem], kind: str) -> list[tuple[int, dict[str, str]]]:
    try:
        return _read(path, data, kind=kind)
    except FileUnreadable as exc:
        problems.append(RowProblem(src, exc.line, exc.field, exc.reason))
        return []
    except OSError as exc:  # the CLI names a file that is not there or not readable
        problems.append(RowProblem(src, 0, "file", exc.strerror or type(exc).__name__))
        return []


def _write(report: ImportReport, write) -> ImportReport:
    """Run the writes of a checked file in one transaction: all of it or (ImportRefused) none."""
    try:
        with transaction.atomic():
            write()
    except ImportRefused as exc:
        return _refused([exc.problem], report.warnings)
    return report


def import_engine(leads_path: str, evidence_path: str | None = None, *, leads_data: Any = None,
                  evidence_data: Any = None) -> ImportReport:
    """The engine's `leads` (+ `evidence`) files, CSV or Parquet. Every row is checked first; any
    problem and nothing is imported (report.refused). Importing the same files twice changes nothing."""
    problems: list[RowProblem] = []
    warnings: list[str] = []
    evidence: dict[str, list[EvidenceLine]] = {}
    if evidence_path:
        src = os.path.basename(evidence_path)
        for line, f in _file_rows(src, evidence_path, evidence_data, problems, "engine"):
            r = _Row(src, line, f, problems)
            for k in EVIDENCE_REQUIRED:
                if not f.get(k):
                    r.fail(k, "required")
            lead_id = r.text("lead_id", Evidence, "key", limit=LEAD_ID_MAX)
            role = r.text("role", Evidence, "role")
            site_id = r.text("site_id", Evidence, "site_id")
            settlement_id = r.text("settlement_id", Evidence, "settlement_id")
            code = r.text("canonical_code", Evidence, "canonical_code")
            product_id = r.text("product_id", Evidence, "product_id")
            line_no = r.integer("line_no")
            settled_at = r.time("settled_at")
            amount = r.decimal("amount", Evidence, "amount")
            pseudonym = r.insured("insured_id", f.get("insured_id", ""))
            if not r.ok:
                continue
            evidence.setdefault(lead_id, []).append(EvidenceLine(
                key=_evidence_key(["MODEL", lead_id, role, site_id, settlement_id, f.get("line_no", ""), code]),
                role=role, site_id=site_id, settlement_id=settlement_id, line_no=line_no, settled_at=settled_at,
                canonical_code=code, product_id=product_id, insured_pseudonym=pseudonym, amount=amount))
    src = os.path.basename(leads_path)
    arrivals: list[tuple[int, LeadFacts, str]] = []
    seen_ids = set()
    for line, f in _file_rows(src, leads_path, leads_data, problems, "engine"):
        r = _Row(src, line, f, problems)
        for k in LEAD_REQUIRED:
            if not f.get(k):
                r.fail(k, "required")
        kind = f.get("subject_kind", "").upper()
        if f.get("subject_kind") and kind not in ("SITE", "INSURED", "RING"):
            r.fail("subject_kind", f"{_show(f['subject_kind'])}: SITE, INSURED or RING")
        lead_id = r.text("lead_id", Lead, "ref", limit=LEAD_ID_MAX)
        model = r.text("model", Lead, "model")
        if kind == "INSURED":
            subject = r.insured("subject_id", f.get("subject_id", ""))
        else:  # a site's id goes into Action and SanctionRequest (64) too; a ring joins several
            subject = r.text("subject_id", Lead, "subject_id", limit=64 if kind == "SITE" else None)
        risk = f.get("risk", "").upper()
        if risk not in RISK_ORDER:
            r.fail("risk", f"{_show(f.get('risk', ''))}: HIGH, MEDIUM, LOW or empty")
        # A file from before statuses existed has no column (or an empty cell): its models were in use.
        status = f.get("model_status", "").strip().upper() or DEFAULT_MODEL_STATUS
        if status not in MODEL_STATUS_LABELS:
            r.fail("model_status", f"{_show(f.get('model_status', ''))}: {', '.join(MODEL_STATUS_LABELS)} or empty")
        facts = LeadFacts(
            source=Source.MODEL, model=model, model_version=r.text("model_version", Lead, "model_version"),
            model_status=status,
            subject_kind=kind, subject_id=subject, region=r.text("region", Lead, "region"),
            score=r.score("score"), risk=risk if risk in RISK_ORDER else "", summary=r.free_text("summary"),
            packs=r.integer("packs") or 0, lines=r.integer("lines") or 0, amount=r.decimal("amount", Lead, "amount"),
            window_start=r.time("window_start"), window_end=r.time("window_end"))
        if not r.ok:
            continue
        seen_ids.add(lead_id)
        arrivals.append((line, facts, lead_id))
    for orphan in sorted(set(evidence) - seen_ids):
        warnings.append(f"evidence for lead_id {orphan} not in {src}: not imported")
    if problems:
        return _refused(problems, warnings)
    report = ImportReport(warnings=warnings)

    def write():
        for line, facts, lead_id in arrivals:
            try:
                arrive(facts, f"MODEL:{lead_id}", evidence.get(lead_id, []), report)
            except ImportRefused as exc:
                raise ImportRefused(RowProblem(src, line, exc.problem.field, exc.problem.reason)) from None
    return _write(report, write)


# --- handed-down batches and complaints ----------------------------------------------------


def import_batch(path: str, source: Source, number: str, received_on: date, *, data: Any = None,
                 user=None) -> ImportReport:
    """A batch (国家局/省局移交, 举报投诉): rows of subject and description, CSV or XLSX.
    Every row is checked first; any problem and nothing is imported, not even the batch record
    (so the corrected file may come with its date). The same batch (source, number) imported twice
    changes nothing; a batch number seen before with another date is refused."""
    if source not in HANDED_DOWN:
        raise ValueError(f"source {source.value}: a batch is NATIONAL, PROVINCIAL or COMPLAINT")
    number = number.strip()
    problem = text_problem(number, Batch._meta.get_field("number").max_length or 64, "batch number")
    if problem:
        raise ValueError(f"batch number: {problem}")
    known = Batch.objects.filter(source=source.value, number=number).first()
    if known is not None and known.received_on != received_on:
        raise ValueError(f"batch {number} of {source.value} was received on {known.received_on}, not {received_on}")
    src = os.path.basename(path)
    problems: list[RowProblem] = []
    unknown: set[str] = set()
    rows: list[tuple[str, str, str, str]] = []
    for line, raw in _file_rows(src, path, data, problems, "batch"):
        f: dict[str, str] = {}
        for k, v in raw.items():
            if k in BATCH_ALIASES:
                f[BATCH_ALIASES[k]] = v
            else:
                unknown.add(k)
        r = _Row(src, line, f, problems)
        named = f.get("subject_kind") or ("INSURED" if f.get("insured_id") else "SITE")
        kind = SUBJECT_KIND_ALIASES.get(named.upper() if named.isascii() else named)
        if kind is None:
            r.fail("subject_kind", f"{_show(f.get('subject_kind', ''))}: SITE or INSURED")
            continue
        if kind == "INSURED":
            column = "insured_id" if f.get("insured_id") else "subject_id"
            subject = r.insured(column, f.get(column, ""))
            if r.ok and not subject:
                r.fail("insured_id", "required")
        else:
            subject = r.text("subject_id", Site, "site_id", required=True)
        description = r.free_text("description")
        region = r.text("region", Lead, "region")
        if r.ok:
            rows.append((kind, subject, description, region))
    warnings = [f"{src}: unknown columns ignored: {', '.join(_show(u)[1:-1] for u in sorted(unknown)[:20])}"] if unknown else []
    if problems:
        return _refused(problems, warnings)
    report = ImportReport(warnings=warnings)

    def write():
        batch, _ = Batch.objects.get_or_create(source=source.value, number=number,
                                               defaults={"received_on": received_on, "imported_by": user})
        if batch.received_on != received_on:  # another import of the number won the race
            raise ImportRefused(RowProblem(src, 0, "received_on", f"batch {number} was received on {batch.received_on}"))
        for kind, subject, description, region in rows:
            region = region or (Site.objects.filter(site_id=subject).values_list("region", flat=True).first() or "")
            facts = LeadFacts(source=source, model=source.value, subject_kind=kind, subject_id=subject, region=region,
                              batch=batch, summary=description)
            digest = hashlib.sha256(f"{kind}|{subject}|{description}".encode()).hexdigest()[:24]
            arrive(facts, f"{source.value}:{number}:{digest}", [], report, description)
    return _write(report, write)


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


def import_sites(path: str, *, data: Any = None) -> ImportReport:
    """The site registry (site_id, site_kind, region, name), checked whole, then written whole."""
    src = os.path.basename(path)
    problems: list[RowProblem] = []
    rows: list[tuple[str, dict[str, str]]] = []
    for line, f in _file_rows(src, path, data, problems, "sites"):
        r = _Row(src, line, f, problems)
        site_id = r.text("site_id", Site, "site_id", required=True)
        kind = (f.get("site_kind") or "").upper()
        if kind not in ("", "PHARMACY", "INSTITUTION"):
            r.fail("site_kind", f"{_show(kind)}: PHARMACY or INSTITUTION")
        values = {"kind": kind, "region": r.text("region", Site, "region"), "name": r.text("name", Site, "name")}
        if r.ok:
            rows.append((site_id, values))
    if problems:
        return _refused(problems)
    report = ImportReport()

    def write():
        for site_id, values in rows:
            site, created = Site.objects.get_or_create(site_id=site_id, defaults=values)
            if created:
                pass
            elif any(getattr(site, k) != v for k, v in values.items()):
                Site.objects.filter(pk=site.pk).update(**values)
            else:
                report.unchanged += 1
    return _write(report, write)
