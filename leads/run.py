"""One leads run: read, canonicalise, judge every line as REPLAY would, run the models, write.

    out/leads.csv, leads.parquet        one row per lead (leads.md, Output)
    out/evidence.csv, evidence.parquet  one row per evidence line
    out/errors.csv                      rows that could not be used: file, line, field, reason
    out/network.png                     the resale network of the top leads
    out/summary.json                    counts per verdict and model, timings
    out/lines.csv, lines.parquet        (with `lines_out`) every line's verdict, in REPLAY's order
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq

from . import assemble, canon, engines, network, robust, splitpack, sql, staging
from tracecode.server.config import Config

from .config import LeadsConfig
from .inputs import InputError, Limits, Pseudonyms, read_sites, settlement_reason

ERROR_FIELDS = ("file", "line", "field", "reason")
LINE_FIELDS = ("file", "line", "site_id", "settlement_id", "line_no", "code", "verdict", "canonical_code",
               "first_site_id", "first_settlement_id", "first_settled_at")


@dataclass
class Options:
    files: list[str]
    issuance: list[str]
    out: str
    sites: str | None = None
    engine: str = "duckdb"
    spark_master: str = "local[2]"
    pseudonyms: Pseudonyms = field(default_factory=Pseudonyms)
    config: LeadsConfig = field(default_factory=LeadsConfig)
    server_config: Config | None = None  # the verification settings (timezone, prefixes, limits)
    lines_out: bool = False
    progress: bool = True
    workdir: str | None = None  # scratch (staged Parquet, DuckDB database); a temp dir by default


@dataclass
class Result:
    leads: int
    evidence: int
    lines: int
    errors: int
    verdicts: dict
    seconds: dict


class _Stages:
    """Progress of a run: one tqdm bar over its stages (stderr; off with --quiet), and timings."""

    def __init__(self, enabled: bool, names: list[str]):
        from tqdm import tqdm
        self.bar = tqdm(total=len(names), desc="leads", unit="stage", disable=not enabled, leave=True)
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def file_done(self, staged) -> None:
        """A file staged: shown while the read stage runs (it is most of a long run)."""
        self.files = getattr(self, "files", 0) + 1
        self.rows = getattr(self, "rows", 0) + staged.rows
        self.bar.set_postfix_str(f"read {self.files} file(s), {self.rows:,} rows")

    def done(self, name: str, note: str = "") -> None:
        now = time.perf_counter()
        engines._profile(f"stage {name}", self.t)
        self.seconds[name] = round(now - self.t, 3)
        self.t = now
        self.bar.set_postfix_str(f"{name} {note}".strip())
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


STAGES = ["read", "canonicalise", "verdicts", "models", "write"]
# Intermediate tables no later step reads: dropped as soon as they are done with (memory).
DROP_AFTER = {"s3": ("s1", "s2"), "settlements": ("s3",), "jl2": ("jl", "repeats", "before")}


def run(opts: Options) -> Result:
    cfg = opts.server_config or Config()
    limits = Limits.from_config(cfg)
    profile = canon.profile_of(cfg)
    tz = ZoneInfo(cfg.timezone)
    os.makedirs(opts.out, exist_ok=True)
    own_work = opts.workdir is None
    work = opts.workdir or tempfile.mkdtemp(prefix="tracecode-leads-")
    os.makedirs(work, exist_ok=True)
    stages = _Stages(opts.progress, STAGES)
    errors: list[InputError] = []
    engine = None
    try:
        # Read: every file in a worker process (row checks, pseudonyms; for DuckDB the codec too,
        # as a pre-pass; Spark runs it on its executors), staged as Parquet; then the registry.
        keys_in_staging = engines.kind(opts.engine).keys_in_staging
        staged_lines, staged_iss = staging.stage_all(opts.files, opts.issuance, work, limits, opts.pseudonyms,
                                                     profile, keys_in_staging, progress=stages.file_done)
        for st in staged_lines + staged_iss:
            errors.extend(st.errors)
        n_lines = sum(st.rows for st in staged_lines)
        sites = read_sites(opts.sites, errors)
        stages.done("read", f"{n_lines:,} lines")
        engine = engines.make(opts.engine, work, opts.spark_master)
        engine.load_lines([st.path for st in staged_lines], profile)
        engine.load_parquet("issuance_rows", [st.path for st in staged_iss])
        for step in sql.ISSUANCE_STEPS:
            engine.materialise(step)
        for fi, line in _rows(engine.fetch(sql.ISSUANCE_CONFLICTS), "file_index", "line"):
            errors.append(InputError(opts.issuance[fi], line, "code",
                                     "conflict: an earlier record issued this code for another product (kept)"))
        engine.drop("issuance_rows", "iss_agg", "iss_multi")
        stages.done("canonicalise")

        for step in sql.verdict_steps(cfg.max_lines):
            engine.materialise(step)
            engine.drop(*DROP_AFTER.get(step.name, ()))
        engine.register("split_v", splitpack.judge(engine.fetch(sql.SPLIT_LINES)))
        engine.materialise(sql.VERDICTS)
        engine.drop("jl2", "fast_v", "split_v", "packs", "issuance")
        _rejected(engine, opts.files, cfg, errors)
        verdict_counts = dict(_rows(engine.fetch(
            "SELECT verdict, COUNT(*) AS n FROM verdicts GROUP BY verdict ORDER BY verdict"), "verdict", "n"))
        if opts.lines_out:
            _write_lines(engine.fetch(sql.ALL_LINES), opts.files, opts.out, tz)
        engine.drop("lines", "settlements", "same_lines")
        stages.done("verdicts")

        models = opts.config.models
        for step in sql.model_steps(models):
            engine.materialise(step)
        edges = list(_rows(engine.fetch("SELECT first_site, later_site, packs FROM edges "
                                        "ORDER BY first_site, later_site"), "first_site", "later_site", "packs"))
        rings = robust.rings(edges, models["RING"].params["min_sites"])
        # Inside the engine a ring is its number (a ring id can be long: every member's id);
        # assemble() names it as leads.md says.
        engine.register("rings", pa.table({
            "site_id": pa.array([s for r in rings for s in r], pa.string()),
            "ring": pa.array([f"#{n}" for n, r in enumerate(rings) for _ in r], pa.string())}))
        registry = {s: (k, r) for s, k, r in _rows(sites, "site_id", "site_kind", "region")}
        groups = {s: (r, k) for s, (k, r) in registry.items() if k and r}
        rates = list(_rows(engine.fetch("SELECT site_id, total, flagged FROM site_rates ORDER BY site_id"),
                           "site_id", "total", "flagged"))
        ab = models["ABNORMAL_SITE"].params
        scored = [s for s in robust.robust_scores(rates, groups, ab["min_peers"])
                  if s.score >= ab["min_z"] and s.flagged >= ab["min_flagged"]]
        engine.register("abnormal", pa.table({"site_id": pa.array([s.site_id for s in scored], pa.string())}))
        engine.materialise(sql.Step("evidence_keys", sql.evidence_select(models)))
        ev = engine.fetch(sql.EVIDENCE_LINES)
        figures = _figures(engine, rings, edges, scored, models)
        stages.done("models")

        ring_ids = {f"#{n}": "+".join(r) for n, r in enumerate(rings)}
        leads, evidence = assemble.assemble(ev, figures, registry, opts.config, tz, ring_ids)
        _write_outputs(opts.out, leads, evidence, errors)
        top = [ld.subject_id for ld in leads if ld.model == "RESALE_BUYER"][: opts.config.top_network_leads]
        network.draw(os.path.join(opts.out, "network.png"), edges, top, rings)
        stages.done("write", f"{len(leads)} leads")
        result = Result(len(leads), len(evidence), n_lines, len(errors), verdict_counts, stages.seconds)
        with open(os.path.join(opts.out, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump({"engine": opts.engine, "files": opts.files, "lines": n_lines, "errors": len(errors),
                       "verdicts": verdict_counts,
                       "leads_per_model": {m: sum(1 for ld in leads if ld.model == m) for m in models},
                       "rings": ["+".join(r) for r in rings], "seconds": stages.seconds},
                      fh, ensure_ascii=False, indent=2)
        return result
    finally:
        stages.close()
        if engine is not None:
            engine.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _rows(table: pa.Table, *names: str):
    return zip(*(table[n].to_pylist() for n in names)) if table.num_rows else iter(())


def _rejected(engine, files: list[str], cfg, errors: list[InputError]) -> None:
    """Rows of settlements REPLAY rejects as a whole, with REPLAY's reason."""
    t = engine.fetch(sql.REJECTED)
    by_seq: dict[int, list] = defaultdict(list)
    for row in t.to_pylist():
        by_seq[row["seq"]].append(row)
    for seq in sorted(by_seq):
        rows = by_seq[seq]
        first = rows[0]
        if first["kind"] == "C":
            reason = "settlement id already used in this job with different lines"
        else:
            reason = settlement_reason(first["site_id"], first["settlement_id"], first["at_ms"],
                                       [(r["code"], r["product_id"], r["units"]) for r in rows], cfg)
        for r in rows:
            errors.append(InputError(files[r["file_index"]], r["line"], "settlement", reason))


def _figures(engine, rings, edges, scored, models) -> dict[str, dict[str, dict]]:
    """Per model and subject: the score and the figures its summary names."""
    fig: dict[str, dict[str, dict]] = {m: {} for m in models}
    for s, packs, others in _rows(engine.fetch("SELECT subject, packs_resold, other_sites FROM m_buyer"),
                                  "subject", "packs_resold", "other_sites"):
        fig["RESALE_BUYER"][s] = {"score": packs, "packs_resold": packs, "other_sites": others}
    for s, packs, others in _rows(engine.fetch("SELECT subject, packs_resold, other_sites FROM m_source"),
                                  "subject", "packs_resold", "other_sites"):
        fig["RESALE_SOURCE"][s] = {"score": packs, "packs_resold": packs, "other_sites": others}
    ring_packs = dict(_rows(engine.fetch(
        "SELECT a.ring, COUNT(DISTINCT r.ckey) AS packs FROM resale r JOIN rings a ON a.site_id = r.first_site "
        "JOIN rings b ON b.site_id = r.later_site AND b.ring = a.ring GROUP BY a.ring"), "ring", "packs"))
    for n, r in enumerate(rings):
        rid = f"#{n}"
        members = set(r)
        links = sum(1 for a, b, _ in edges if a in members and b in members and a != b)
        fig["RING"][rid] = {"score": ring_packs.get(rid, 0), "sites": len(r), "packs_resold": ring_packs.get(rid, 0),
                            "edges": links}
    days = models["STOCKPILING"].params["window_hours"] / 24
    for s, packs, sites, nprod, prod in _rows(engine.fetch(
            "SELECT subject, best_packs, best_sites, n_products, a_product FROM m_stock"),
            "subject", "best_packs", "best_sites", "n_products", "a_product"):
        fig["STOCKPILING"][s] = {"score": packs, "sites": sites, "window_days": days,
                                 "products": prod if nprod == 1 else f"{prod} and {nprod - 1} more"}
    for s, n in _rows(engine.fetch("SELECT subject, mismatched FROM m_swap"), "subject", "mismatched"):
        fig["SWAP"][s] = {"score": n}
    for s in scored:
        fig["ABNORMAL_SITE"][s.site_id] = {"score": s.score, "flagged": s.flagged, "total": s.total,
                                           "rate": s.rate, "median": s.median, "peers": s.peers}
    return fig


def _write_csv(path: str, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_outputs(out: str, leads, evidence, errors: list[InputError]) -> None:
    _write_csv(os.path.join(out, "leads.csv"), assemble.LEAD_FIELDS, (assemble.lead_csv_row(ld) for ld in leads))
    _write_csv(os.path.join(out, "evidence.csv"), assemble.EVIDENCE_FIELDS, evidence)
    pq.write_table(assemble.leads_table(leads), os.path.join(out, "leads.parquet"))
    pq.write_table(assemble.evidence_table(evidence), os.path.join(out, "evidence.parquet"))
    errs = sorted(set(errors), key=lambda e: (e.file, e.line, e.field, e.reason))
    _write_csv(os.path.join(out, "errors.csv"), ERROR_FIELDS, ((e.file, e.line, e.field, e.reason) for e in errs))


def _write_lines(t: pa.Table, files: list[str], out: str, tz) -> None:
    """Every line's verdict in REPLAY's order (the differential test reads this)."""
    first_at = [None if v is None else assemble.fmt_time(v, tz) for v in t["first_at_ms"].to_pylist()]
    table = pa.table({
        "file": pa.array([files[i] for i in t["file_index"].to_pylist()], pa.string()),
        "line": t["line"], "site_id": t["site_id"], "settlement_id": t["settlement_id"],
        "line_no": t["line_no"], "code": t["code"], "verdict": t["verdict"],
        "canonical_code": t["ckey"], "first_site_id": t["first_site_id"],
        "first_settlement_id": t["first_settlement_id"], "first_settled_at": pa.array(first_at, pa.string())})
    pq.write_table(table, os.path.join(out, "lines.parquet"))
    _write_csv(os.path.join(out, "lines.csv"), LINE_FIELDS,
               ([("" if v is None else v) for v in row.values()] for row in table.to_pylist()))
