"""Backtest: a candidate model configuration beside the current one over the same history.

`tracecode leads backtest FILE... --issuance ... --config CANDIDATE.toml [--baseline CURRENT.toml]
[--conclusions FILE] --out DIR` judges the history once per configuration and compares, per model:

- the subjects each configuration finds, and those the candidate adds and drops;
- among the subjects the ledger has concluded (the console's conclusions export: one row per
  concluded lead, `finding` CONFIRMED = 查证属实 or UNFOUNDED = 查证不属实, technical causes
  counted unfounded as in the weekly report), the confirmed ones the candidate would miss and the
  unfounded ones it would no longer raise.

A lead is matched by (model, subject), not by lead id: a candidate that bumps a model's version
changes its lead ids, and a conclusion on the earlier version's lead still says whether that
subject was fraud. Writes backtest.json (everything, lists included) and backtest.csv (one row
per model) into --out, with each configuration's own leads under current/ and candidate/.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass, field

from tracecode.clients.files import check_readable

from .assemble import MODEL_ORDER
from .config import LeadsConfig

FINDINGS = ("CONFIRMED", "UNFOUNDED")
CONCLUSION_FIELDS = ("lead_id", "model", "model_version", "subject_id", "finding")
REPORT_FIELDS = ("model", "current_version", "candidate_version", "current_leads", "candidate_leads", "added",
                 "dropped", "confirmed", "confirmed_found_current", "confirmed_missed", "unfounded",
                 "unfounded_found_current", "unfounded_dropped")


class ConclusionsError(ValueError):
    """A conclusions file that cannot be used: names the file, line and field."""


@dataclass(frozen=True, slots=True)
class Conclusion:
    model: str
    subject_id: str
    finding: str  # CONFIRMED or UNFOUNDED


def read_conclusions(path: str, ignored: dict[str, int] | None = None) -> list[Conclusion]:
    """The console's export (`tracecode console conclusions` or the page's CSV): a header with
    at least CONCLUSION_FIELDS. A subject concluded both ways under one model (two leads, two
    versions) counts as confirmed: the ledger proved fraud at least once. Rows of a model this
    engine does not have (a ledger keeps the leads of models since removed, or of other sources)
    cannot be compared: they are counted per model into `ignored`, which the command reports."""
    check_readable(path)
    out: dict[tuple[str, str], str] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if header is None:
            raise ConclusionsError(f"{path}: line 1: empty file, expected a header with {', '.join(CONCLUSION_FIELDS)}")
        header = [h.strip() for h in header]
        missing = [f for f in CONCLUSION_FIELDS if f not in header]
        if missing:
            raise ConclusionsError(f"{path}: line 1: header lacks {', '.join(missing)}")
        col = {f: header.index(f) for f in CONCLUSION_FIELDS}
        for n, row in enumerate(rows, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ConclusionsError(f"{path}: line {n}: {len(row)} fields, the header has {len(header)}")
            model = row[col["model"]].strip()
            subject = row[col["subject_id"]].strip()
            finding = row[col["finding"]].strip().upper()
            if not model:
                raise ConclusionsError(f"{path}: line {n}: field model: empty")
            if not subject:
                raise ConclusionsError(f"{path}: line {n}: field subject_id: empty")
            if finding not in FINDINGS:
                raise ConclusionsError(f"{path}: line {n}: field finding: {finding!r} is not one of "
                                       f"{', '.join(FINDINGS)}")
            if model not in MODEL_ORDER:
                if ignored is not None:
                    ignored[model] = ignored.get(model, 0) + 1
                continue
            key = (model, subject)
            if out.get(key) != "CONFIRMED":
                out[key] = finding
    return [Conclusion(m, s, f) for (m, s), f in sorted(out.items())]


@dataclass
class ModelReport:
    model: str
    current_version: int
    candidate_version: int
    current: set = field(default_factory=set)
    candidate: set = field(default_factory=set)
    confirmed: set = field(default_factory=set)
    unfounded: set = field(default_factory=set)

    @property
    def added(self) -> list[str]:
        return sorted(self.candidate - self.current)

    @property
    def dropped(self) -> list[str]:
        return sorted(self.current - self.candidate)

    @property
    def confirmed_missed(self) -> list[str]:
        """Proven fraud the candidate would not raise: the cost of the change."""
        return sorted(self.confirmed - self.candidate)

    @property
    def unfounded_dropped(self) -> list[str]:
        """Leads the ledger found unfounded that the candidate would no longer raise (the
        current configuration raises them): the inspectors' time the change saves."""
        return sorted((self.unfounded & self.current) - self.candidate)

    def row(self) -> dict:
        return {"model": self.model, "current_version": self.current_version,
                "candidate_version": self.candidate_version, "current_leads": len(self.current),
                "candidate_leads": len(self.candidate), "added": len(self.added), "dropped": len(self.dropped),
                "confirmed": len(self.confirmed), "confirmed_found_current": len(self.confirmed & self.current),
                "confirmed_missed": len(self.confirmed_missed), "unfounded": len(self.unfounded),
                "unfounded_found_current": len(self.unfounded & self.current),
                "unfounded_dropped": len(self.unfounded_dropped)}

    def lists(self) -> dict:
        """The subjects behind the counts (backtest.json: `added_subjects`, ...)."""
        return {"added_subjects": self.added, "dropped_subjects": self.dropped,
                "confirmed_missed_subjects": self.confirmed_missed,
                "unfounded_dropped_subjects": self.unfounded_dropped}


def compare(current_leads: list[tuple[str, str]], candidate_leads: list[tuple[str, str]],
            current: LeadsConfig, candidate: LeadsConfig, conclusions: list[Conclusion]) -> list[ModelReport]:
    """*_leads: (model, subject_id) of every lead each configuration wrote."""
    reports = {m: ModelReport(m, current.model(m).version, candidate.model(m).version) for m in MODEL_ORDER}
    for m, s in current_leads:
        reports[m].current.add(s)
    for m, s in candidate_leads:
        reports[m].candidate.add(s)
    for c in conclusions:
        (reports[c.model].confirmed if c.finding == "CONFIRMED" else reports[c.model].unfounded).add(c.subject_id)
    return [reports[m] for m in MODEL_ORDER]


def _subjects(out: str) -> list[tuple[str, str]]:
    with open(os.path.join(out, "leads.csv"), newline="", encoding="utf-8") as fh:
        return [(r["model"], _restore(r["subject_id"])) for r in csv.DictReader(fh)]


def _restore(cell: str) -> str:
    from tracecode.rules.cells import restore
    return restore(cell)


def run_backtest(opts, current: LeadsConfig, candidate: LeadsConfig,
                 conclusions: list[Conclusion]) -> list[ModelReport]:
    """opts: a leads run's Options; its `out` receives current/, candidate/ and the report."""
    from .run import run
    os.makedirs(opts.out, exist_ok=True)
    outs = {}
    for name, cfg in (("current", current), ("candidate", candidate)):
        outs[name] = os.path.join(opts.out, name)
        run(dataclasses.replace(opts, out=outs[name], config=cfg))
    reports = compare(_subjects(outs["current"]), _subjects(outs["candidate"]), current, candidate, conclusions)
    write_report(opts.out, reports)
    return reports


def write_report(out: str, reports: list[ModelReport]) -> None:
    with open(os.path.join(out, "backtest.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, REPORT_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in reports:
            w.writerow(r.row())
    with open(os.path.join(out, "backtest.json"), "w", encoding="utf-8") as fh:
        json.dump({"models": [{**r.row(), **r.lists()} for r in reports]}, fh, ensure_ascii=False, indent=2)


def describe(reports: list[ModelReport]) -> str:
    """The report as lines of text for the terminal (Chinese, the figures' names in English)."""
    lines = []
    for r in reports:
        if not (r.current or r.candidate or r.confirmed or r.unfounded):
            continue
        row = r.row()
        lines.append(f"{r.model} v{r.current_version}→v{r.candidate_version}: 线索 {row['current_leads']}→"
                     f"{row['candidate_leads']}（新增 {row['added']}，减少 {row['dropped']}）；已查证属实 "
                     f"{row['confirmed']} 个中候选配置漏掉 {row['confirmed_missed']} 个；查证不属实 {row['unfounded']} "
                     f"个中不再提出 {row['unfounded_dropped']} 个")
    return "\n".join(lines) or "no leads and no conclusions in either configuration"
