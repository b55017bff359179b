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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import assemble, canon, engines, network, receipts, robust, sql
from . import state as state_mod
from tracecode.rules.cells import FORMULA_STARTS, neutralise_row
from tracecode.server.config import Config

from .config import LeadsConfig
from tracecode.clients.files import check_readable

from .inputs import InputError, Limits, Pseudonyms, read_issuance_file, read_sites, settlement_reason

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
    receipts: list[str] = field(default_factory=list)  # receipts files (UNRECEIVED; receipts.py)
    lines_out: bool = False
    progress: bool = True
    workdir: str | None = None  # scratch (staged Parquet, DuckDB database); a temp dir by default
    # Incremental runs (state.py): resume from the state in this directory if it has one, and
    # save the state after this run there.
    state: str | None = None


@dataclass
class Result:
    leads: int
    evidence: int
    lines: int
    errors: int
    verdicts: dict
    seconds: dict
    judged_per_file: dict = field(default_factory=dict)  # file -> rows judged (errors.csv has the rest)


class _Stages:
    """Progress of a run: one tqdm bar over its stages (stderr; off with --quiet), and timings."""

    def __init__(self, enabled: bool, names: list[str]):
        from tqdm import tqdm
        self.bar = tqdm(total=len(names), desc="leads", unit="stage", disable=not enabled, leave=True)
        self.seconds: dict[str, float] = {}
        self.t = time.perf_counter()

    def file_done(self, rows: int) -> None:
        """A file read: shown while the read stage runs (it is most of a long run)."""
        self.files = getattr(self, "files", 0) + 1
        self.rows = getattr(self, "rows", 0) + rows
        self.bar.set_postfix_str(f"read {self.files} file(s), {self.rows:,} rows")

    def done(self, name: str, note: str = "") -> None:
        now = time.perf_counter()
        engines.log_timing(f"stage {name}", self.t)
        self.seconds[name] = round(now - self.t, 3)
        self.t = now
        self.bar.set_postfix_str(f"{name} {note}".strip())
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


STAGES = ["read", "canonicalise", "verdicts", "models", "write"]
# Intermediate tables no later step reads: dropped as soon as they are done with (memory).
DROP_AFTER = {"s3": ("s1", "s2"), "settlements": ("s3",)}


def run(opts: Options) -> Result:
    cfg = opts.server_config or Config()
    limits = Limits.from_config(cfg)
    profile = canon.profile_of(cfg)
    tz = ZoneInfo(cfg.timezone)
    # A missing or unreadable input is an error before anything runs or is written (issue 23):
    # judging the rest without it would call every line of a missing issuance file UNKNOWN.
    for path in [*opts.files, *opts.issuance, *opts.receipts, *([opts.sites] if opts.sites else [])]:
        check_readable(path)
    inc = None
    if opts.state:
        if opts.lines_out:
            raise state_mod.StateError("--lines writes every line of a full run: it cannot be given with --state")
        if opts.receipts:
            # A receipt covers only the sales after it, so unreceived lines are final once judged and
            # could be saved like the flagged ones; until the state carries them and the receipts,
            # UNRECEIVED runs in full runs only.
            raise state_mod.StateError("--receipts (the UNRECEIVED model) needs a full run: receipts are not part of "
                                       "the saved state; run it without --state")
        inc = state_mod.State(opts.state, state_mod.fingerprint(opts.config.models, limits, opts.pseudonyms),
                             opts.config.model("STOCKPILING").params["window_hours"])
        if not inc.resuming and not opts.issuance:
            inc.close()
            raise state_mod.StateError(f"state {inc.dir} is new: its first run reads the whole history and "
                                       "needs --issuance")
    own_work = opts.workdir is None
    work = opts.workdir or tempfile.mkdtemp(prefix="tracecode-leads-")
    os.makedirs(work, exist_ok=True)
    stages = _Stages(opts.progress, STAGES)
    errors: list[InputError] = []
    engine = None
    try:
        # Read: every file read, checked, pseudonymised and canonicalised where the engine works
        # (DuckDB: worker processes here; Spark: its executors), then the registry.
        engine = engines.make(opts.engine, work, opts.spark_master)
        n_lines, read_errors, iss_paths = engine.read_inputs(opts.files, opts.issuance, limits, opts.pseudonyms,
                                                             profile, progress=stages.file_done)
        errors.extend(read_errors)
        sites = read_sites(opts.sites, errors)
        stages.done("read", f"{n_lines:,} lines")
        # Outputs only once every input was read to its end (InputFileError stops a run before).
        os.makedirs(opts.out, exist_ok=True)
        if inc is not None:  # the state's issuance and packs, with this run's new records
            engine.drop("issuance_rows")
            inc.load(engine, iss_paths, read_issuance_file(0, [], profile, []))
        for step in sql.ISSUANCE_STEPS:
            engine.materialise(step)
        if inc is not None:
            inc.save_issuance(engine)
        for fi, line in _rows(engine.fetch(sql.ISSUANCE_CONFLICTS), "file_index", "line"):
            errors.append(InputError(opts.issuance[fi], line, "code",
                                     "conflict: an earlier record issued this code for another product (kept)"))
        engine.drop("issuance_rows", "iss_agg", "iss_multi")
        stages.done("canonicalise")

        for step in sql.verdict_steps(cfg.max_lines, **(inc.verdict_args() if inc else {})):
            engine.materialise(step)
            if inc is not None and step.name == "s2":
                inc.after_s2(engine, opts.files, tz)
            engine.drop(*DROP_AFTER.get(step.name, ()))
        engine.split_verdicts(sql.SPLIT_LINES_HISTORY if inc is not None and inc.resuming else sql.SPLIT_LINES)
        engine.materialise(sql.VERDICTS)
        # jl2 may be a view of jl and before (sql.Step.view): they go with it.
        engine.drop("jl2", "jl", "repeats", "before", "split_v", "packs", "issuance")
        _rejected(engine, opts.files, cfg, errors)
        # Rows judged per file (replayed copies included: REPLAY answers them): with errors.csv
        # they account for every row of every file (docs/leads.md, Reading).
        judged = dict(_rows(engine.fetch(sql.JUDGED_ROWS), "file_index", "n"))
        judged_per_file = {path: judged.get(fi, 0) for fi, path in enumerate(opts.files)}
        verdict_counts = dict(_rows(engine.fetch(
            "SELECT verdict, COUNT(*) AS n FROM verdicts GROUP BY verdict ORDER BY verdict"), "verdict", "n"))
        if opts.lines_out:
            _write_lines(engine.fetch(sql.ALL_LINES), opts.files, opts.out, tz)
        if inc is not None:  # saves this run's part; resuming, `verdicts` gains the history the models need
            inc.after_verdicts(engine)
        engine.drop("lines", "settlements", "same_lines")
        stages.done("verdicts")

        models = opts.config.models
        engine.register("receipts", receipts.read_receipts(opts.receipts, profile, errors))
        for step in sql.model_steps(models, **(inc.model_args() if inc else {})):
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
        engine.materialise(sql.Step("evidence_keys", sql.evidence_select(models, inc is not None and inc.resuming)))
        ev = engine.fetch(sql.EVIDENCE_LINES)
        figures = _figures(engine, rings, edges, scored, models)
        if inc is not None:  # the state's last tables, while the engine has them
            inc.save_models(engine)
        # Nothing more is asked of the engine: its memory (DuckDB's buffers, up to its limit)
        # goes before the outputs are built in Python, or the two would add up to the run's peak.
        engine.close()
        engine = None
        stages.done("models")

        ring_ids = {f"#{n}": "+".join(r) for n, r in enumerate(rings)}
        t = time.perf_counter()
        leads, evidence = assemble.assemble(ev, figures, registry, opts.config, tz, ring_ids)
        engines.log_timing("assemble", t)
        top = [ld.subject_id for ld in leads if ld.model == "RESALE_BUYER"][: opts.config.top_network_leads]
        drawing = network.start(os.path.join(opts.out, "network.png"), edges, top, rings)
        try:
            t = time.perf_counter()
            _write_outputs(opts.out, leads, evidence, errors)
            engines.log_timing("outputs", t)
        finally:
            t = time.perf_counter()
            drawing.wait()
            engines.log_timing("network.png (waited)", t)
        stages.done("write", f"{len(leads)} leads")
        result = Result(len(leads), len(evidence), n_lines, len(errors), verdict_counts, stages.seconds,
                        judged_per_file)
        with open(os.path.join(opts.out, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump({"engine": opts.engine, "files": opts.files, "lines": n_lines, "errors": len(errors),
                       "judged_per_file": judged_per_file,
                       "verdicts": verdict_counts,
                       "leads_per_model": {m: sum(1 for ld in leads if ld.model == m) for m in models},
                       "rings": ["+".join(r) for r in rings], "seconds": stages.seconds},
                      fh, ensure_ascii=False, indent=2)
        if inc is not None:  # the state moves on only once the outputs are written
            inc.commit(opts.files, opts.engine, n_lines)
        return result
    finally:
        stages.close()
        if inc is not None:
            inc.close()
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
    for s, n in _rows(engine.fetch("SELECT subject, packs FROM m_unreceived"), "subject", "packs"):
        fig["UNRECEIVED"][s] = {"score": n, "packs_unreceived": n}
    for s in scored:
        fig["ABNORMAL_SITE"][s.site_id] = {"score": s.score, "flagged": s.flagged, "total": s.total,
                                           "rate": s.rate, "median": s.median, "peers": s.peers}
    return fig


def write_csv(path: str, header, rows) -> None:
    """Every CSV of a run (leads, evidence, errors, lines): a text cell a spreadsheet would take
    for a formula (a site's region `=HYPERLINK(..)`, say) gets a leading apostrophe
    (rules/cells.py); numbers and every other cell are written as they are, so ids, which never
    start with = + @ (and rarely with -), come out unchanged. The Parquet outputs are data and
    are not neutralised."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(neutralise_row(header))
        w.writerows(map(neutralise_row, rows))


def _csv_column(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as write_csv writes its cells: text neutralised as rules/cells.py says, then
    quoted as the csv module quotes (a comma, a quote or a newline in it), numbers as str()."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return pc.fill_null(col.cast(pa.string()), "")
    col = pc.fill_null(col, "")
    formula = pc.starts_with(col, FORMULA_STARTS[0])
    for start in FORMULA_STARTS[1:]:
        formula = pc.or_(formula, pc.starts_with(col, start))
    # (a choice between two string columns costs more than the tests: made only where needed)
    if pc.any(formula).as_py():
        col = pc.if_else(formula, pc.binary_join_element_wise("'", col, ""), col)
    quote = pc.or_(pc.or_(pc.match_substring(col, ","), pc.match_substring(col, '"')), pc.match_substring(col, "\n"))
    if pc.any(quote).as_py():
        col = pc.if_else(quote, pc.binary_join_element_wise('"', pc.replace_substring(col, '"', '""'), '"', ""), col)
    return col


def write_csv_table(path: str, header, table: pa.Table) -> None:
    """write_csv for a table (the evidence: hundreds of thousands of rows), column-wise: the same
    bytes (tests/test_leads_outputs.py holds the two to each other)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerow(neutralise_row(header))
        if table.num_rows:
            lines = pc.binary_join_element_wise(*(_csv_column(table[c]) for c in header), ",")
            for chunk in (lines.chunks if isinstance(lines, pa.ChunkedArray) else [lines]):
                fh.write("\n".join(chunk.to_pylist()))
                fh.write("\n")


def _write_outputs(out: str, leads, evidence: pa.Table, errors: list[InputError]) -> None:
    write_csv(os.path.join(out, "leads.csv"), assemble.LEAD_FIELDS, (assemble.lead_csv_row(ld) for ld in leads))
    write_csv_table(os.path.join(out, "evidence.csv"), assemble.EVIDENCE_FIELDS, evidence)
    pq.write_table(assemble.leads_table(leads), os.path.join(out, "leads.parquet"))
    pq.write_table(assemble.evidence_table(evidence), os.path.join(out, "evidence.parquet"))
    errs = sorted(set(errors), key=lambda e: (e.file, e.line, e.field, e.reason))
    write_csv(os.path.join(out, "errors.csv"), ERROR_FIELDS, ((e.file, e.line, e.field, e.reason) for e in errs))


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
    write_csv(os.path.join(out, "lines.csv"), LINE_FIELDS,
               ([("" if v is None else v) for v in row.values()] for row in table.to_pylist()))
