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
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pyarrow as pa

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
             cfg: LeadsConfig, tz: ZoneInfo, ring_ids: dict[str, str]) -> tuple[list[Lead], list[tuple]]:
    """ev: sql.EVIDENCE_LINES; figures: per model, per subject, the model's figures (score and
    what its summary names); sites: site -> (kind, region) from the registry; ring_ids: the
    engine's ring numbers -> leads.md ring ids (member site ids, sorted, joined by '+')."""
    cols = {c: ev[c].to_pylist() for c in ev.column_names}
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(cols["model"], cols["subject_id"])):
        groups[key].append(i)
    leads, evidence = [], []
    for (model, engine_subject), idx in groups.items():
        m = cfg.model(model)
        if m.status == "RETIRED":  # a retired version writes neither leads nor evidence
            continue
        fig = dict(figures[model][engine_subject])
        subject = ring_ids[engine_subject] if model == "RING" else engine_subject
        lid = lead_id(model, m.version, subject)
        at = [cols["at_ms"][i] for i in idx]
        paid_idx = [i for i in idx if cols["role"][i] == "later"] if model in RESALE_MODELS else idx
        amounts = [cols["amount_fen"][i] for i in paid_idx if cols["amount_fen"][i] is not None]
        amount = fmt_amount(sum(amounts)) if amounts else ""
        site_lines = Counter(cols["site_id"][i] for i in idx)
        region = _region(m.subject_kind, subject, site_lines, sites)
        score = float(fig.pop("score"))
        fig.update(subject_id=subject, packs=len({cols["ckey"][i] for i in idx}), lines=len(idx),
                   score=score, score_text=fmt_score(score))
        leads.append(Lead(lid, model, m.version, m.subject_kind, subject, region, fmt_time(min(at), tz),
                          fmt_time(max(at), tz), score, risk_of(score, m.risk), fig["packs"], len(idx), amount,
                          summary(m.summary_zh, "zh", fig, amount), summary(m.summary_en, "en", fig, amount),
                          m.status))
        for i in idx:
            evidence.append((lid, cols["role"][i], cols["site_id"][i], cols["settlement_id"][i],
                             cols["line_no"][i], fmt_time(cols["at_ms"][i], tz), cols["ckey"][i],
                             cols["product_id"][i], cols["insured"][i], fmt_amount(cols["amount_fen"][i]),
                             cols["at_ms"][i], cols["ord"][i]))
    order = {m: n for n, m in enumerate(MODEL_ORDER)}
    leads.sort(key=lambda ld: (order[ld.model], -ld.score, ld.subject_id))
    rank = {ld.lead_id: n for n, ld in enumerate(leads)}
    evidence.sort(key=lambda e: (rank[e[0]], e[10], e[11], e[1]))
    return leads, [e[:10] for e in evidence]


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


def evidence_table(rows: list[tuple]) -> pa.Table:
    cols: list = list(zip(*rows)) if rows else [[] for _ in EVIDENCE_FIELDS]
    types = (pa.string(),) * 4 + (pa.int64(),) + (pa.string(),) * 5
    arrays = [pa.array(list(c), t) for c, t in zip(cols, types)]
    arrays[-1] = pa.array([v or None for v in cols[-1]], pa.string())
    return pa.table(dict(zip(EVIDENCE_FIELDS, arrays)))


def lead_csv_row(ld: Lead) -> list:
    return [ld.lead_id, ld.model, ld.model_version, ld.subject_kind, ld.subject_id, ld.region, ld.window_start,
            ld.window_end, fmt_score(ld.score), ld.risk, ld.packs, ld.lines, ld.amount, ld.summary,
            ld.summary_en, ld.model_status]
