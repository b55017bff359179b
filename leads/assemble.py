"""Lead rows and evidence rows from the models' evidence lines (leads.md, Output).

Engine-independent: both engines hand over the same evidence table (sql.EVIDENCE_LINES) and
figures, and everything here is a deterministic function of them, so two runs, or two engines,
on the same input write byte-identical leads.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc

from .config import AMOUNT_TEXT, LeadsConfig

# `summary` is Chinese (what the console shows); `summary_en` and `model_status` came later and
# are appended, so readers that take columns by position still find the first fourteen.
LEAD_FIELDS = ("lead_id", "model", "model_version", "subject_kind", "subject_id", "region", "window_start",
               "window_end", "score", "risk", "packs", "lines", "amount", "summary", "summary_en", "model_status")
EVIDENCE_FIELDS = ("lead_id", "role", "site_id", "settlement_id", "line_no", "settled_at", "canonical_code",
                   "product_id", "insured_id", "amount")
# Resale leads count what the fund paid a second time: the `later` lines only.
RESALE_MODELS = ("RESALE_BUYER", "RESALE_SOURCE", "RING")
MODEL_ORDER = ("RESALE_BUYER", "RESALE_SOURCE", "RING", "STOCKPILING", "SWAP", "UNRECEIVED", "ABNORMAL_SITE")


@dataclass(frozen=True, slots=True)
class Lead:
    lead_id: str
    model: str
    model_version: int
    subject_kind: str
    subject_id: str
    region: str
    window_start: str
    window_end: str
    score: float
    risk: str
    packs: int
    lines: int
    amount: str
    summary: str
    summary_en: str
    model_status: str


def lead_id(model: str, version: int, subject_id: str) -> str:
    """A function of model, version and subject only (leads.md): a later run over more data
    names the same subject's lead the same, so the ledger adds to the lead it has."""
    h = hashlib.sha256(f"{model}\x1f{version}\x1f{subject_id}".encode()).hexdigest()
    return f"{model[:3]}-{h[:20]}"


def fmt_time(ms: int, tz: ZoneInfo) -> str:
    t = datetime.fromtimestamp(ms / 1000, tz)
    return t.isoformat(timespec="milliseconds" if ms % 1000 else "seconds")


def fmt_amount(fen: int | None) -> str:
    return "" if fen is None else str(Decimal(fen).scaleb(-2))


# fmt_times' buckets: every offset change of a time zone since 1972 falls on a quarter hour of
# UTC; a bucket whose two ends disagree (an older, odder change) is formatted row by row.
_BUCKET_MS = 15 * 60 * 1000


def fmt_times(at_ms: pa.Array, tz: ZoneInfo) -> pa.Array:
    """fmt_time over a column (the evidence's times): the same strings, by Arrow, the offset of
    each quarter hour looked up once."""
    at_ms = at_ms.combine_chunks() if isinstance(at_ms, pa.ChunkedArray) else at_ms
    if len(at_ms) == 0:
        return pa.array([], pa.string())
    buckets = pc.divide(at_ms, _BUCKET_MS)  # truncates: the floor below for times before 1970
    buckets = pc.if_else(pc.greater(pc.multiply(buckets, _BUCKET_MS), at_ms), pc.subtract(buckets, 1), buckets)
    distinct = pc.unique(buckets).to_pylist()
    offset_ms, offset_text, odd = [], [], []
    for b in distinct:
        start, end = (datetime.fromtimestamp(b * _BUCKET_MS / 1000, tz),
                      datetime.fromtimestamp(((b + 1) * _BUCKET_MS - 1) / 1000, tz))
        off = start.utcoffset() or timedelta(0)  # (never None for an aware time)
        if off != end.utcoffset() or off.microseconds or off.seconds % 60:
            odd.append(b)
        offset_ms.append(int(off.total_seconds() * 1000))
        offset_text.append(start.isoformat()[19:])  # '+08:00' (no fraction: the bucket starts on a minute)
    where = pc.index_in(buckets, value_set=pa.array(distinct, buckets.type))
    local = pc.add(at_ms, pa.array(offset_ms, pa.int64()).take(where)).cast(pa.timestamp("ms"))

    def padded(values, width: int):  # (the components and a join: twice as fast as strftime)
        return pc.utf8_lpad(values.cast(pa.string()), width, "0")
    ms = pc.millisecond(local)
    fraction = pc.if_else(pc.equal(ms, 0), "", pc.binary_join_element_wise(".", padded(ms, 3), ""))
    out = pc.binary_join_element_wise(
        padded(pc.year(local), 4), "-", padded(pc.month(local), 2), "-", padded(pc.day(local), 2), "T",
        padded(pc.hour(local), 2), ":", padded(pc.minute(local), 2), ":", padded(pc.second(local), 2), fraction,
        pa.array(offset_text, pa.string()).take(where), "")
    if odd:
        rows = pc.indices_nonzero(pc.is_in(buckets, value_set=pa.array(odd, buckets.type))).to_pylist()
        values = out.to_pylist()
        for i in rows:
            values[i] = fmt_time(at_ms[i].as_py(), tz)
        out = pa.array(values, pa.string())
    return out


def fmt_amounts(fen: pa.Array) -> pa.Array:
    """fmt_amount over a column: '' for null."""
    fen = fen.combine_chunks() if isinstance(fen, pa.ChunkedArray) else fen
    fen = fen.cast(pa.int64())
    mag = pc.abs(fen)
    whole = pc.divide(mag, 100).cast(pa.string())
    cents = pc.utf8_lpad(pc.subtract(mag, pc.multiply(pc.divide(mag, 100), 100)).cast(pa.string()), 2, "0")
    sign = pc.if_else(pc.less(fen, 0), "-", "")
    return pc.fill_null(pc.binary_join_element_wise(sign, whole, ".", cents, ""), "")  # the last: the separator


def fmt_score(score: float) -> str:
    if math.isinf(score):
        return "inf"
    return str(int(score)) if float(score).is_integer() else f"{score:.4f}"


def risk_of(score: float, cutoffs) -> str:
    for bound, risk in cutoffs:
        if score >= bound:
            return risk
    return cutoffs[-1][1]


def assemble(ev: pa.Table, figures: dict[str, dict[str, dict]], sites: dict[str, tuple[str, str]],
             cfg: LeadsConfig, tz: ZoneInfo, ring_ids: dict[str, str]) -> tuple[list[Lead], pa.Table]:
    """ev: sql.EVIDENCE_LINES; figures: per model, per subject, the model's figures (score and
    what its summary names); sites: site -> (kind, region) from the registry; ring_ids: the
    engine's ring numbers -> leads.md ring ids (member site ids, sorted, joined by '+').

    The leads in output order, and the evidence as a table of EVIDENCE_FIELDS in output order
    (the leads' order, then time, line and role). A lead's figures come from Arrow's group-by over
    its evidence lines and its rows are formatted column-wise: a national run has hundreds of
    thousands of evidence lines, and per-row Python was most of the run's writing."""
    key = pc.binary_join_element_wise(ev["model"], ev["subject_id"], "\x1f")
    not_paid = pc.and_(pc.is_in(ev["model"], value_set=pa.array(RESALE_MODELS)), pc.not_equal(ev["role"], "later"))
    paid = pc.if_else(not_paid, pa.scalar(None, pa.int64()), ev["amount_fen"].cast(pa.int64()))
    every = pc.CountOptions(mode="all")
    per_lead = pa.table({"key": key, "model": ev["model"], "subject": ev["subject_id"], "at": ev["at_ms"],
                         "ckey": ev["ckey"], "paid": paid, "ord": ev["ord"]}).group_by(
        ["key", "model", "subject"], use_threads=False).aggregate(
        [("at", "min"), ("at", "max"), ("ckey", "count_distinct", every), ("ord", "count", every),
         ("paid", "sum"), ("paid", "count")])
    insured = [m.name for m in cfg.models.values() if m.subject_kind == "INSURED"]
    site_lines: dict[str, Counter] = defaultdict(Counter)
    if insured:  # an insured person's region: the site of most of their evidence lines
        sel = pc.is_in(ev["model"], value_set=pa.array(insured, pa.string()))
        counts = pa.table({"key": pc.filter(key, sel), "site": pc.filter(ev["site_id"], sel)}).group_by(
            ["key", "site"], use_threads=False).aggregate([("site", "count", every)])
        for k, site, n in zip(*(counts[c].to_pylist() for c in ("key", "site", "site_count"))):
            site_lines[k][site] = n
    leads, keys = [], []
    for row in per_lead.to_pylist():
        model, engine_subject = row["model"], row["subject"]
        m = cfg.model(model)
        if m.status == "RETIRED":  # a retired version writes neither leads nor evidence
            continue
        fig = dict(figures[model][engine_subject])
        subject = ring_ids[engine_subject] if model == "RING" else engine_subject
        amount = fmt_amount(row["paid_sum"]) if row["paid_count"] else ""
        region = _region(m.subject_kind, subject, site_lines.get(row["key"], Counter()), sites)
        score = float(fig.pop("score"))
        lines = row["ord_count"]
        fig.update(subject_id=subject, packs=row["ckey_count_distinct"], lines=lines, score=score,
                   score_text=fmt_score(score))
        leads.append(Lead(lead_id(model, m.version, subject), model, m.version, m.subject_kind, subject, region,
                          fmt_time(row["at_min"], tz), fmt_time(row["at_max"], tz), score, risk_of(score, m.risk),
                          fig["packs"], lines, amount, summary(m.summary_zh, "zh", fig, amount),
                          summary(m.summary_en, "en", fig, amount), m.status))
        keys.append(row["key"])
    order = {m: n for n, m in enumerate(MODEL_ORDER)}
    ranked = sorted(range(len(leads)), key=lambda i: (order[leads[i].model], -leads[i].score, leads[i].subject_id))
    leads = [leads[i] for i in ranked]
    # Each evidence line's lead by its rank (null: a retired model's line, left out), then the
    # output order: rank, time, line, role.
    rank = pc.index_in(key, value_set=pa.array([keys[i] for i in ranked], pa.string()))
    kept = ev.append_column("rank", rank).filter(pc.is_valid(rank))
    kept = kept.take(pc.sort_indices(kept, sort_keys=[("rank", "ascending"), ("at_ms", "ascending"),
                                                      ("ord", "ascending"), ("role", "ascending")]))
    lids = pa.array([ld.lead_id for ld in leads], pa.string()).take(kept["rank"])
    evidence = pa.table({
        "lead_id": lids, "role": kept["role"], "site_id": kept["site_id"], "settlement_id": kept["settlement_id"],
        "line_no": kept["line_no"].cast(pa.int64()), "settled_at": fmt_times(kept["at_ms"], tz),
        "canonical_code": kept["ckey"], "product_id": kept["product_id"], "insured_id": kept["insured"],
        "amount": fmt_amounts(kept["amount_fen"])})
    return leads, evidence


def summary(template: str, lang: str, fig: dict, amount: str) -> str:
    known, unknown = AMOUNT_TEXT[lang]
    return template.format(**fig, amount_text=known.format(amount=amount) if amount else unknown)


def _region(kind: str, subject: str, site_lines: Counter, sites: dict[str, tuple[str, str]]) -> str:
    if kind == "SITE":
        return sites.get(subject, ("", ""))[1]
    if kind == "INSURED":  # the region of the site with most of the person's evidence lines
        best = min(site_lines.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        return sites.get(best, ("", ""))[1]
    regions = {sites.get(s, ("", ""))[1] for s in subject.split("+")}
    return regions.pop() if len(regions) == 1 else ""


def leads_table(leads: list[Lead]) -> pa.Table:
    return pa.table({
        "lead_id": pa.array([ld.lead_id for ld in leads], pa.string()),
        "model": pa.array([ld.model for ld in leads], pa.string()),
        "model_version": pa.array([ld.model_version for ld in leads], pa.int32()),
        "subject_kind": pa.array([ld.subject_kind for ld in leads], pa.string()),
        "subject_id": pa.array([ld.subject_id for ld in leads], pa.string()),
        "region": pa.array([ld.region for ld in leads], pa.string()),
        "window_start": pa.array([ld.window_start for ld in leads], pa.string()),
        "window_end": pa.array([ld.window_end for ld in leads], pa.string()),
        "score": pa.array([ld.score for ld in leads], pa.float64()),
        "risk": pa.array([ld.risk for ld in leads], pa.string()),
        "packs": pa.array([ld.packs for ld in leads], pa.int64()),
        "lines": pa.array([ld.lines for ld in leads], pa.int64()),
        "amount": pa.array([ld.amount or None for ld in leads], pa.string()),
        "summary": pa.array([ld.summary for ld in leads], pa.string()),
        "summary_en": pa.array([ld.summary_en for ld in leads], pa.string()),
        "model_status": pa.array([ld.model_status for ld in leads], pa.string()),
    })


def evidence_table(evidence: pa.Table) -> pa.Table:
    """evidence.parquet: the evidence with every column text but line_no, an empty amount null."""
    cols = {name: evidence[name].cast(pa.string()) for name in EVIDENCE_FIELDS}
    cols["line_no"] = evidence["line_no"].cast(pa.int64())
    cols["amount"] = pc.if_else(pc.equal(cols["amount"], ""), pa.scalar(None, pa.string()), cols["amount"])
    return pa.table(cols)


def lead_csv_row(ld: Lead) -> list:
    return [ld.lead_id, ld.model, ld.model_version, ld.subject_kind, ld.subject_id, ld.region, ld.window_start,
            ld.window_end, fmt_score(ld.score), ld.risk, ld.packs, ld.lines, ld.amount, ld.summary,
            ld.summary_en, ld.model_status]
