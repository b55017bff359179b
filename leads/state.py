"""Incremental runs: the state one run saves so the next adds new days instead of re-reading
the history (docs/leads.md, Incremental runs; issue 26).

    STATE/manifest.json             format, version, configuration fingerprint, generations,
                                    watermark (last settled_at judged), settlements so far
    STATE/g000001/<table>/*.parquet one directory per run (a generation), written by the engine
    STATE/.lock                     one run at a time

Tables (the columns are fixed below and cast on write, so a state written by DuckDB is read by
Spark and the other way round). Appended by every run, read over all generations:

    issuance  the merged issuance record of each code (the latest generation's row wins)
    settled   each (site, settlement id) first used: time, lines, body fingerprint (replays)
    firsts    each dispensed pack's first dispense: its line (resale evidence, the `f` of resale)
    used      units used of packs sold in parts (the sequential pass resumes from them)
    flagged   every line with a pack flag (DUPLICATE, SWAP's mismatches, ABNORMAL_SITE's lines)
    stock_ev  lines of qualifying STOCKPILING windows, each once (their figures: `closed`)

Bounded: `tail`, OK lines of insured persons in the last window_hours before the watermark
(the only lines a STOCKPILING window that a later line may join can hold), appended by each run
and dropped with the generations whose lines are all older than that. Snapshots, rewritten by
each run and read from the latest generation only:

    closed    per (person, product) the best qualifying window (packs, sites): grows with them
    rates     per site its lines and flagged lines (ABNORMAL_SITE): bounded by the sites

A run's files and its manifest entry become the state only when the manifest is replaced
(atomically, after the outputs are written); a failed run leaves the previous state as it was,
and its half-written generation is removed by the next attempt.

May import: what the leads package may (pyarrow, the engines), nothing else.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import time
from datetime import datetime, timezone

import pyarrow as pa

from tracecode.rules.verdicts import PACK_FLAGS, sql_in

from .sql import Step, settlement_fp

FORMAT = "tracecode-leads-state"
VERSION = 1

_V = [("ord", "BIGINT"), ("seq", "BIGINT"), ("li", "BIGINT"), ("file_index", "INTEGER"), ("pos", "BIGINT"),
      ("site_id", "VARCHAR"), ("settlement_id", "VARCHAR"), ("at_ms", "BIGINT"), ("line_no", "BIGINT"),
      ("ckey", "VARCHAR"), ("product_id", "VARCHAR"), ("issued", "VARCHAR"), ("units", "BIGINT"),
      ("insured", "VARCHAR"), ("amount_fen", "BIGINT"), ("verdict", "VARCHAR"), ("first_ord", "BIGINT")]
TABLES = {
    "issuance": [("ckey", "VARCHAR"), ("product_id", "VARCHAR"), ("pack_units", "BIGINT"), ("expiry", "BIGINT"),
                 ("status", "VARCHAR"), ("gen", "BIGINT")],
    "settled": [("site_id", "VARCHAR"), ("settlement_id", "VARCHAR"), ("at_ms", "BIGINT"), ("n_lines", "BIGINT"),
                ("fp1", "BIGINT"), ("fp2", "BIGINT")],
    "firsts": _V, "used": [("ckey", "VARCHAR"), ("used", "BIGINT")], "flagged": _V, "stock_ev": _V,
    "tail": _V, "closed": [("insured", "VARCHAR"), ("issued", "VARCHAR"), ("packs", "BIGINT"), ("sites", "BIGINT")],
    "rates": [("site_id", "VARCHAR"), ("total", "BIGINT"), ("flagged", "BIGINT")],
}
SNAPSHOTS = ("closed", "rates")
_ARROW = {"BIGINT": pa.int64(), "INTEGER": pa.int32(), "VARCHAR": pa.string()}
COLS = ", ".join(c for c, _ in _V)


class StateError(ValueError):
    """A state that cannot be used with this run (cli: one line, exit 2)."""


def fingerprint(models, rules, pseudonyms) -> dict:
    """What the saved figures depend on: each model's version and thresholds (not its status or
    risk cut-offs, which only label leads), the settings the rules judge by (rules.settlement.
    RulesSettings: timezone, limits, code prefixes), and the pseudonym key (by its fingerprint, an
    HMAC that reveals nothing of it)."""
    pz = pseudonyms.pseudonymizer
    key = (f"{pz.key_id}:{pz.fingerprint()}" if pz is not None
           else ("input pseudonymised" if pseudonyms.already else "none"))
    return {
        "models": {n: {"version": m.version, "params": dict(sorted(m.params.items()))} for n, m in sorted(models.items())},
        "rules": {f: getattr(rules, f) for f in sorted(rules.__dataclass_fields__)},
        "pseudonym_key": key,
    }


def _differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif a != b:
        yield path


def _q(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


class State:
    """One run's view of a state directory: what it resumes from (if anything) and what it adds."""

    def __init__(self, directory: str, fp: dict, window_hours: float):
        self.dir = os.path.abspath(directory)
        self.fp = fp
        self.window_ms = int(window_hours * 3_600_000)
        os.makedirs(self.dir, exist_ok=True)
        self._lock = open(os.path.join(self.dir, ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateError(f"state {self.dir}: another run is using it") from None
        path = os.path.join(self.dir, "manifest.json")
        self.manifest: dict = {}  # empty: no state yet (this run is a full one that saves it)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    m = json.load(fh)
            except (OSError, ValueError) as exc:
                self.close()
                raise StateError(f"state {path}: unreadable manifest ({exc})") from None
            if m.get("format") != FORMAT or m.get("version") != VERSION:
                self.close()
                raise StateError(f"state {path}: format {m.get('format')!r} version {m.get('version')!r}, "
                                 f"this tracecode reads {FORMAT!r} version {VERSION}")
            diff = list(_differences(m.get("fingerprint", {}), fp))
            if diff:
                self.close()
                what = "another pseudonym key" if "pseudonym_key" in diff else "another configuration"
                raise StateError(f"state {self.dir} was saved with {what} (differs in: {', '.join(diff)}): "
                                 "its figures do not hold for this run; run the whole history into a new state "
                                 "directory")
            self.manifest = m
        self.resuming = bool(self.manifest)
        self.gen: int = (self.manifest["generation"] if self.resuming else 0) + 1
        self.seq0: int = self.manifest["next_seq"] if self.resuming else 0
        self.watermark: int = int(self.manifest["watermark_ms"]) if self.resuming else 0
        self.gdir = os.path.join(self.dir, f"g{self.gen:06d}")
        # A generation no manifest names is a failed attempt's: start it again from nothing.
        shutil.rmtree(self.gdir, ignore_errors=True)
        self.new_watermark: int | None = self.watermark if self.resuming else None
        self.new_seq = self.seq0

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # -- reading ------------------------------------------------------------------------------
    def _parts(self, table: str) -> list[str]:
        gens = self.manifest["generations"] if self.resuming else []
        if table in SNAPSHOTS:
            gens = gens[-1:]
        elif table == "tail":  # the generations that still hold lines of the last window
            gens = [g for g in gens if g["watermark_ms"] >= self.watermark - self.window_ms]
        return [p for g in gens for p in sorted(glob.glob(os.path.join(self.dir, g["dir"], table, "*.parquet")))]

    def _load(self, engine, name: str, table: str) -> None:
        parts = self._parts(table)
        if parts:
            engine.load_parquet(name, parts)
        else:
            engine.register(name, pa.table({c: pa.array([], _ARROW[t]) for c, t in TABLES[table]}))

    def load(self, engine, issuance_paths: list[str], empty_issuance: pa.Table) -> None:
        """Instead of loading `issuance_rows` from the staged files: with a state, the new records
        after the state's merged record of each code they or this run's lines name (issue.lua's
        merge continues from it); and the state's settlements and packs for the verdict steps."""
        if not self.resuming:
            if issuance_paths:
                engine.load_parquet("issuance_rows", issuance_paths)
            else:
                engine.register("issuance_rows", empty_issuance)
            return
        if issuance_paths:
            engine.load_parquet("iss_in", issuance_paths)
        else:
            engine.register("iss_in", empty_issuance)
        for name, table in (("h_issuance", "issuance"), ("h_settled", "settled"), ("h_firsts", "firsts"),
                            ("h_used", "used")):
            self._load(engine, name, table)
        # The state's record goes first (ord -1): the first record fixes a code's product.
        engine.materialise(Step("issuance_rows", """
SELECT ckey, ord, product_id, pack_units, expiry, status, file_index, line FROM iss_in
UNION ALL
SELECT ckey, CAST(-1 AS BIGINT) AS ord, product_id, pack_units, expiry, status, CAST(-1 AS INTEGER) AS file_index,
       CAST(0 AS BIGINT) AS line
FROM (SELECT ckey, MAX_BY(product_id, gen) AS product_id, MAX_BY(pack_units, gen) AS pack_units,
             MAX_BY(expiry, gen) AS expiry, MAX_BY(status, gen) AS status
      FROM h_issuance
      WHERE ckey IN (SELECT ckey FROM lines WHERE ckey <> '' UNION SELECT ckey FROM iss_in)
      GROUP BY ckey) h"""))

    def verdict_args(self) -> dict:
        return {"seq0": self.seq0, "history": self.resuming}

    def model_args(self) -> dict:
        return {"since_ms": self.watermark - self.window_ms if self.resuming else None}

    # -- checks -------------------------------------------------------------------------------
    def after_s2(self, engine, files: list[str], tz) -> None:
        """The new lines must all come after the state in REPLAY's order (every settlement after
        the watermark), or an incremental run could not equal a full one; a settlement sent again
        with its first use's time (a replay, or a conflict REPLAY rejects) is the exception: a full
        run orders it after that first use too. The state moves on by this run's settlements."""
        from .assemble import fmt_time
        row = engine.fetch("SELECT COUNT(*) AS n, MAX(pmax) AS wm FROM s2").to_pylist()[0]
        self.new_seq = self.seq0 + row["n"]
        known = [x for x in (self.new_watermark, row["wm"]) if x is not None]
        self.new_watermark = max(known) if known else None
        if not self.resuming:
            return
        wm = self.watermark
        bad = engine.fetch(f"""
SELECT l.file_index, l.line, s.at_ms FROM s2 s JOIN lines l ON l.file_index = s.file_index AND l.pos = s.first_pos
LEFT JOIN h_settled h ON h.site_id = s.site_id AND h.settlement_id = s.settlement_id AND h.at_ms = s.at_ms
WHERE h.site_id IS NULL AND (s.pmax <= {wm} OR (s.bad = 0 AND s.at_ms <= {wm}))
ORDER BY s.file_index, s.first_pos LIMIT 1""").to_pylist()
        if bad:
            b = bad[0]
            at = "an unknown time" if b["at_ms"] is None else fmt_time(b["at_ms"], tz)
            raise StateError(f"{files[b['file_index']]}: line {b['line']}: settled_at {at} is not after the last "
                             f"settlement of state {self.dir} ({fmt_time(wm, tz)}): an incremental run adds later "
                             "lines only (run the whole history into a new state directory)")

    # -- writing ------------------------------------------------------------------------------
    def _write(self, engine, table: str, select: str) -> None:
        """One table of this generation, written by the engine where the data is (no rows pass
        through the driver), every column cast to the state's type."""
        path = os.path.join(self.gdir, table)
        cols = ", ".join(f"CAST({c} AS {t}) AS {c}" for c, t in TABLES[table])
        q = f"SELECT {cols} FROM ({select}) x"
        t = time.perf_counter()
        if engine.name == "duckdb":
            os.makedirs(path, exist_ok=True)
            engine.con.execute(f"COPY ({q}) TO {_q(os.path.join(path, 'part-0.parquet'))} (FORMAT PARQUET)")
        else:
            engine.spark.sql(engine.spark_sql(q)).write.mode("overwrite").parquet(path)
        from .engines import log_timing
        log_timing(f"state {table}", t)

    def save_issuance(self, engine) -> None:
        """After the issuance steps: the merged record of every code this run's records name."""
        self._write(engine, "issuance", f"SELECT i.*, {self.gen} AS gen FROM issuance i"
                    + (" WHERE i.ckey IN (SELECT ckey FROM iss_in)" if self.resuming else ""))
        if self.resuming:
            engine.drop("iss_in")

    def after_verdicts(self, engine) -> None:
        """This run's verdicts are in `verdicts` and the split packs' state in `split_state`
        (engine.split_verdicts): save what later lines depend on, then (resuming) make
        `verdicts` this run's lines plus the history's lines the models need."""
        self._write(engine, "settled", f"""
SELECT s.site_id, s.settlement_id, s.at_ms, s.n_lines, x.fp1, x.fp2
FROM settlements s JOIN ({settlement_fp("settlements s", "s.kind = 'J'")}) x ON x.seq = s.seq""")
        self._write(engine, "firsts", f"SELECT {COLS} FROM verdicts WHERE ord = first_ord")
        self._write(engine, "used", "SELECT ckey, used FROM split_state")
        self._write(engine, "flagged", f"SELECT {COLS} FROM verdicts WHERE verdict IN {sql_in(PACK_FLAGS)}")
        if not self.resuming:
            return
        for name, table in (("h_flagged", "flagged"), ("h_tail", "tail"), ("h_stock_ev", "stock_ev"),
                            ("h_closed", "closed"), ("h_rates", "rates")):
            self._load(engine, name, table)
        engine.materialise(Step("v_new", "SELECT * FROM verdicts"))
        # STOCKPILING looks again only at the (person, product) pairs this run's OK lines touch:
        # the windows of every other pair are saved (closed, stock_ev) and cannot change.
        engine.materialise(Step("touched", "SELECT DISTINCT insured, issued FROM v_new "
                                           "WHERE verdict = 'OK' AND insured <> ''"))
        # History lines, each once: flagged ones (DUPLICATE and SWAP's lines, ABNORMAL_SITE's);
        # then OK ones: the touched pairs' window tail, the first dispenses of packs resold, the
        # saved windows' lines (those three may share lines).
        bound = self.watermark - self.window_ms
        engine.materialise(Step("verdicts", f"""
SELECT {COLS} FROM v_new
UNION ALL
SELECT {COLS} FROM h_flagged
UNION ALL
SELECT {COLS} FROM (
  SELECT {", ".join("t." + c for c, _ in _V)} FROM h_tail t
  JOIN touched g ON g.insured = t.insured AND g.issued = t.issued
  WHERE t.at_ms >= {bound}
  UNION SELECT {COLS} FROM h_firsts WHERE ord IN (
      SELECT first_ord FROM v_new WHERE verdict = 'DUPLICATE'
      UNION SELECT first_ord FROM h_flagged WHERE verdict = 'DUPLICATE')
  UNION SELECT {COLS} FROM h_stock_ev) h"""))
        engine.drop("h_settled", "h_firsts", "h_used", "h_issuance")

    def save_models(self, engine) -> None:
        """After the models, before the outputs (the engine is closed then): the window tail,
        STOCKPILING's windows and the site rates into this generation. They become part of the
        state only with the manifest (commit)."""
        wm = self.new_watermark if self.new_watermark is not None else 0
        bound = wm - self.window_ms
        # This run's part of the tail (the earlier parts stay while their generation's lines can be
        # in a window with a later line: _parts).
        self._write(engine, "tail", f"SELECT {COLS} FROM {'v_new' if self.resuming else 'verdicts'} "
                                    f"WHERE verdict = 'OK' AND insured <> '' AND at_ms >= {bound}")
        # Every qualifying window's figures and lines: a later run recomputes only the pairs it
        # touches (windows only gain lines, so the maximum and the union stay right).
        self._write(engine, "closed", f"""
SELECT insured, issued, MAX(packs) AS packs, MAX(sites) AS sites
FROM (SELECT insured, issued, packs, sites FROM m_stock_win
      {"UNION ALL SELECT insured, issued, packs, sites FROM h_closed" if self.resuming else ""}) w
GROUP BY insured, issued""")
        self._write(engine, "stock_ev", f"""
SELECT DISTINCT {", ".join("b." + c for c, _ in TABLES["stock_ev"])}
FROM m_stock_win w JOIN ok_person o
  ON o.insured = w.insured AND o.issued = w.issued AND o.at_ms >= w.a_at AND o.at_ms <= w.a_at + {self.window_ms}
JOIN verdicts b ON b.ord = o.ord
{"LEFT JOIN h_stock_ev e ON e.ord = b.ord WHERE e.ord IS NULL" if self.resuming else ""}""")
        self._write(engine, "rates", "SELECT site_id, total, flagged FROM site_rates")

    def commit(self, files: list[str], engine_name: str, lines: int) -> None:
        """After the outputs: the manifest (the state moves on only here)."""
        wm = self.new_watermark if self.new_watermark is not None else 0
        bound = wm - self.window_ms
        gens = list(self.manifest["generations"]) if self.resuming else []
        gens.append({"gen": self.gen, "dir": os.path.basename(self.gdir), "engine": engine_name, "files": files,
                     "lines": lines, "watermark_ms": wm,
                     "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        manifest = {"format": FORMAT, "version": VERSION, "fingerprint": self.fp, "generation": self.gen,
                    "watermark_ms": wm, "next_seq": self.new_seq, "generations": gens}
        path = os.path.join(self.dir, "manifest.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, ensure_ascii=False, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        # Tail parts no window can reach any more: no manifest names them now (bounded state).
        for g in gens:
            if g["watermark_ms"] < bound:
                shutil.rmtree(os.path.join(self.dir, g["dir"], "tail"), ignore_errors=True)
