"""Incremental runs (issue 26, docs/leads.md): a history split into days; a full run over all
days against a full run over the first days that saves its state plus an incremental run over
the last day. Leads and evidence must be byte-identical, on DuckDB and on Spark (local mode),
and a state written by one engine must be read by the other. Planted across the boundary: packs
first dispensed in the saved history and resold on the new day (DUPLICATE, RESALE_BUYER and
RESALE_SOURCE), split packs partly used before it, a STOCKPILING window spanning it, a ring
closed by it, a settlement replayed and one reused with other lines; and the states a run must
refuse (another configuration, another pseudonym key, days already added).
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from datetime import datetime, timedelta

import pytest

from tracecode.leads import synth
from tracecode.leads.config import load as load_config
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.leads.state import StateError
from tracecode.rules.insured import resident_check_char
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file

T0 = datetime(2024, 6, 1, 8, 0, tzinfo=synth.CST)
PRODUCTS = ["8300001", "8300002", "8300003"]
DAYS = 5
CONFIG = """
[STOCKPILING]
min_packs = 4
min_sites = 3
window_hours = 48
[ABNORMAL_SITE]
min_peers = 5
min_flagged = 4
"""


def raw_id(n: int) -> str:
    first17 = f"31010419900101{n:03d}"
    return first17 + resident_check_char(first17)


class Days:
    """Sales written by hand and at random into one file per day, with that day's issuance."""

    def __init__(self):
        self.codes = synth.Codes(None)
        self.rows = [[] for _ in range(DAYS)]
        self.issuance = [[] for _ in range(DAYS)]
        self.n = 0

    def pack(self, day: int, product: str = PRODUCTS[0], units: int = 1) -> str:
        code = self.codes.cn20(product)
        self.issuance[day].append({"code": code, "product_id": product,
                                   "pack_units": str(units) if units > 1 else ""})
        return code

    def sale(self, day: int, when: timedelta, site: str, codes: list[str], person: str = "",
             billed: str = PRODUCTS[0], units: str = "", sid: str | None = None) -> str:
        self.n += 1
        sid = sid or f"T{self.n:06d}"
        for ln, code in enumerate(codes, 1):
            self.rows[day].append({"site_id": site, "settlement_id": sid,
                                   "settled_at": (T0 + timedelta(days=day) + when).isoformat(),
                                   "line_no": str(ln), "code": code, "product_id": billed, "units": units,
                                   "insured_id": person, "amount": f"{10 + self.n % 7}.50"})
        return sid


def history() -> Days:
    d = Days()
    rnd = random.Random(26)
    sold: list[tuple[str, str, str]] = []  # (code, product, site) of whole packs sold
    split: list[tuple[str, str, str]] = []  # (code, product, site) of 10-unit packs
    for day in range(DAYS):
        for k in range(80):  # background: 12 sites, 20 persons, resales across days, splits, noise
            when = timedelta(minutes=5 * k + rnd.randrange(3))
            site = f"BG{rnd.randrange(12):02d}"
            person = raw_id(rnd.randrange(20)) if rnd.random() < 0.7 else ""
            x = rnd.random()
            product = rnd.choice(PRODUCTS)
            if x < 0.06 and sold:
                code, product, _ = rnd.choice(sold)
                d.sale(day, when, site, [code], person, billed=product)
            elif x < 0.12 and split:
                code, product, first = rnd.choice(split)
                d.sale(day, when, first if rnd.random() < 0.7 else site, [code], person, billed=product,
                       units=str(rnd.choice((1, 2, 3))))
            elif x < 0.16:
                code = d.pack(day, product, units=10)
                split.append((code, product, site))
                d.sale(day, when, site, [code], person, billed=product, units=str(rnd.choice((2, 3))))
            elif x < 0.19:
                d.sale(day, when, site, [d.codes.cn20(product)], person, billed=product)  # never issued
            else:
                codes = [d.pack(day, product) for _ in range(rnd.choice((1, 1, 2)))]
                billed = rnd.choice(PRODUCTS) if rnd.random() < 0.03 else product
                d.sale(day, when, site, codes, person, billed=billed)
                sold.extend((c, product, site) for c in codes)
    last = DAYS - 1
    late = timedelta(hours=10)
    # Packs first dispensed to PX at F1 on day 1, resold at Y1 on the new day (RESALE_BUYER Y1,
    # RESALE_SOURCE PX: both of its packs are resold only then).
    px = [d.pack(1), d.pack(1)]
    d.sale(1, late, "F1", [px[0]], raw_id(900))
    d.sale(1, late + timedelta(minutes=1), "F1", [px[1]], raw_id(900))
    d.sale(last, late, "Y1", [px[0]])
    d.sale(last, late + timedelta(minutes=1), "Y1", [px[1]])
    # A 10-unit pack split at Z1 on days 2 and 3, finished there on the new day, then once more too
    # many at Z1 (QUANTITY_EXCEEDED) and sold at Z2 (DUPLICATE); one split at Z1 on day 3 and sold
    # whole at Z3 on the new day.
    sp = d.pack(2, units=10)
    d.sale(2, late, "Z1", [sp], units="3")
    d.sale(3, late, "Z1", [sp], units="4")
    d.sale(last, late + timedelta(minutes=2), "Z1", [sp], units="3")
    d.sale(last, late + timedelta(minutes=3), "Z1", [sp], units="1")
    d.sale(last, late + timedelta(minutes=4), "Z2", [sp], units="2")
    sq = d.pack(3, units=10)
    d.sale(3, late + timedelta(minutes=1), "Z1", [sq], units="5")
    d.sale(last, late + timedelta(minutes=5), "Z3", [sq])
    # STOCKPILING S1: two packs on day 3, two on the new day, at three sites within 48 h; S2 four
    # packs at three sites on day 0 (a window closed long before the new day); S3 spread too far.
    for day, site, hour in ((3, "G1", 12), (3, "G2", 13), (last, "G3", 1), (last, "G1", 2)):
        d.sale(day, timedelta(hours=hour), site, [d.pack(day)], raw_id(901))
    for site, hour in (("G1", 1), ("G2", 2), ("G3", 3), ("G1", 4)):
        d.sale(0, timedelta(hours=hour), site, [d.pack(0)], raw_id(902))
    for day, site in ((0, "G1"), (0, "G2"), (3, "G3"), (3, "G1")):
        d.sale(day, timedelta(hours=14), site, [d.pack(day)], raw_id(903))
    # S4: a window late on day 3 that no new line joins (its figures come from the state).
    for site, hour in (("G1", 20), ("G2", 21), ("G3", 22), ("G2", 22.5)):
        d.sale(3, timedelta(hours=hour), site, [d.pack(3)], raw_id(904))
    # SWAP W1: two mismatched lines before, the third on the new day.
    for day in (0, 2, last):
        d.sale(day, timedelta(hours=15), "W1", [d.pack(day, PRODUCTS[0])], billed=PRODUCTS[1])
    # RING R1 -> R2 -> R3 in the history, R3 -> R1 on the new day.
    for day, a, b in ((0, "R1", "R2"), (1, "R2", "R3"), (2, "R3", "R1")):
        c = d.pack(day)
        d.sale(day, timedelta(hours=16), a, [c])
        d.sale(last if (a, b) == ("R3", "R1") else day + 1, timedelta(hours=17), b, [c])
    # A day-1 settlement replayed on the new day (same lines: judged once), and its id reused with
    # other lines (rejected as REPLAY rejects it).
    rc = d.pack(1)
    sid = d.sale(1, timedelta(hours=18), "Q1", [rc])
    d.rows[last].append(dict(next(r for r in d.rows[1] if r["settlement_id"] == sid)))
    other = d.pack(last)
    d.sale(last, timedelta(hours=19), "Q2", [other], sid="DUP-ID")
    d.sale(0, timedelta(hours=19), "Q2", [d.pack(0)], sid="DUP-ID")
    for day in range(DAYS):
        d.rows[day].sort(key=lambda r: r["settled_at"])
    return d


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    base = tmp_path_factory.mktemp("days")
    d = history()
    key = str(base / "pseudonym.key")
    generate_key_file(key)
    cfg = base / "leads.toml"
    cfg.write_text(CONFIG, encoding="utf-8")
    lines = [synth.write_csv(str(base / f"day-{k}.csv"), d.rows[k], synth.SETTLEMENT_COLUMNS) for k in range(DAYS)]
    iss = [synth.write_csv(str(base / f"issuance-{k}.csv"), d.issuance[k], ["code", "product_id", "pack_units"])
           for k in range(DAYS)]
    return base, lines, iss, Pseudonymizer.from_file(key), load_config(str(cfg))


def _run(days, name: str, files, issuance, engine="duckdb", state=None, config=None, pz=None) -> str:
    base, _, _, key, cfg = days
    out = str(base / name)
    run(Options(files=files, issuance=issuance, out=out, engine=engine, spark_master="local[1]",
                pseudonyms=Pseudonyms(pz or key), config=config or cfg, progress=False, state=state))
    return out


def _read(out: str, name: str) -> bytes:
    with open(os.path.join(out, name), "rb") as fh:
        return fh.read()


def _leads(out: str) -> list[dict]:
    with open(os.path.join(out, "leads.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _errors(out: str) -> list[dict]:
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _differential(days, engine: str) -> tuple[str, str, str, str, str]:
    """(full run over all days, run over the first days, incremental run over the last, the
    state after it, a copy of the state the first run saved)."""
    base, lines, iss, *_ = days
    full = _run(days, f"{engine}-full", lines, iss, engine)
    state = str(base / f"{engine}-state")
    first = _run(days, f"{engine}-first", lines[:-1], iss[:-1], engine, state=state)
    saved = str(base / f"{engine}-state-first")
    shutil.copytree(state, saved, ignore=shutil.ignore_patterns(".lock"))
    incr = _run(days, f"{engine}-incr", lines[-1:], iss[-1:], engine, state=state)
    return full, first, incr, state, saved


@pytest.fixture(scope="module")
def duck(days):
    return _differential(days, "duckdb")


@pytest.fixture(scope="module")
def spark(days):
    return _differential(days, "spark")


def _assert_same(full: str, incr: str, new_file: str) -> None:
    for name in ("leads.csv", "evidence.csv", "leads.parquet", "evidence.parquet"):
        assert _read(full, name) == _read(incr, name), name
    # errors.csv of the incremental run: the new day's rows of the full run's.
    assert [e for e in _errors(full) if e["file"] == new_file] == _errors(incr)


def test_incremental_equals_full_on_duckdb(days, duck):
    full, first, incr, *_ = duck
    _assert_same(full, incr, days[1][-1])


def test_the_boundary_cases_are_in_the_leads(days, duck):
    full, first, incr, *_ = duck
    pz = days[3]
    before = {(ld["model"], ld["subject_id"]) for ld in _leads(first)}
    after = {(ld["model"], ld["subject_id"]): ld for ld in _leads(incr)}
    # Resold on the new day, first dispensed in the saved history.
    assert ("RESALE_BUYER", "Y1") in after and ("RESALE_BUYER", "Y1") not in before
    assert after[("RESALE_BUYER", "Y1")]["packs"] == "2"
    assert ("RESALE_SOURCE", pz(raw_id(900))) in after and ("RESALE_SOURCE", pz(raw_id(900))) not in before
    # The split pack: finished at Z1, then too many there and resold at Z2; the one split before
    # and sold whole at Z3.
    assert ("RESALE_BUYER", "Z2") in after and ("RESALE_BUYER", "Z3") in after
    assert ("RESALE_BUYER", "Z1") not in after
    # The window across the boundary; the closed one from the state; the spread one nowhere.
    s1 = after[("STOCKPILING", pz(raw_id(901)))]
    assert s1["packs"] == "4" and s1["window_start"][:10] == "2024-06-04" and s1["window_end"][:10] == "2024-06-05"
    assert ("STOCKPILING", pz(raw_id(902))) in after and ("STOCKPILING", pz(raw_id(903))) not in after
    assert ("STOCKPILING", pz(raw_id(904))) in before and after[("STOCKPILING", pz(raw_id(904)))]["packs"] == "4"
    assert ("SWAP", "W1") in after and ("SWAP", "W1") not in before
    assert ("RING", "R1+R2+R3") in after and ("RING", "R1+R2+R3") not in before
    # The reused settlement id is rejected on the new day; its replay is judged once.
    errs = _errors(incr)
    assert {e["reason"] for e in errs} == {"settlement id already used in this job with different lines"}
    with open(os.path.join(incr, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    assert summary["judged_per_file"][days[1][-1]] == sum(1 for _ in open(days[1][-1])) - 2  # header, DUP-ID


def test_lead_ids_and_evidence_carry_over(duck):
    """The ledger adds to the leads it has (console intake: one lead per MODEL:lead_id, evidence
    keyed by lead, role, site, settlement, line and code): a lead of the first run keeps its id,
    and its resale evidence is still there."""
    full, first, incr, *_ = duck
    ids_before = {(ld["model"], ld["subject_id"]): ld["lead_id"] for ld in _leads(first)}
    ids_after = {(ld["model"], ld["subject_id"]): ld["lead_id"] for ld in _leads(incr)}
    kept = set(ids_before) & set(ids_after)
    assert len(kept) >= 5 and all(ids_before[k] == ids_after[k] for k in kept)

    def evidence(out):
        with open(os.path.join(out, "evidence.csv"), newline="", encoding="utf-8") as fh:
            return {tuple(r.values()) for r in csv.DictReader(fh)}
    resale = {ld["lead_id"] for ld in _leads(first) if ld["model"] in ("RESALE_BUYER", "RESALE_SOURCE")}
    old = {e for e in evidence(first) if e[0] in resale}
    assert old and old <= evidence(incr)


def test_state_is_refused_when_it_does_not_fit(days, duck, tmp_path):
    base, lines, iss, key, cfg = days
    copy = str(tmp_path / "state")
    shutil.copytree(duck[4], copy, ignore=shutil.ignore_patterns(".lock"))
    manifest = _read(copy, "manifest.json")
    other_cfg = load_config(None)
    with pytest.raises(StateError, match=r"another configuration \(differs in: .*STOCKPILING.params.window_hours"):
        _run(days, "refused-1", lines[-1:], iss[-1:], state=copy, config=other_cfg)
    k2 = str(tmp_path / "other.key")
    generate_key_file(k2, "k2")
    with pytest.raises(StateError, match="another pseudonym key"):
        _run(days, "refused-2", lines[-1:], iss[-1:], state=copy, pz=Pseudonymizer.from_file(k2))
    # On the command line: one line, exit 2, nothing written.
    out = str(tmp_path / "cli-out")
    done = subprocess.run([sys.executable, "-m", "tracecode.cli", "leads", lines[-1], "--state", copy,
                           "--pseudonym-key", k2, "--config", str(base / "leads.toml"), "--out", out, "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(f"error: state {copy} was saved with another pseudonym "
                                                           "key (differs in: pseudonym_key)")
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.exists(out)
    # A settlement before the state's last one (a late file): refused by file and line, before
    # anything is saved.
    late = synth.write_csv(str(tmp_path / "late.csv"), [
        {"site_id": "L1", "settlement_id": "LATE1", "settled_at": (T0 + timedelta(days=2, hours=3)).isoformat(),
         "line_no": "1", "code": "83000010000000010000", "product_id": PRODUCTS[0]}], synth.SETTLEMENT_COLUMNS)
    with pytest.raises(StateError, match=r"late.csv: line 2: settled_at 2024-06-03T11:00:00\+08:00 is not after the "
                                         r"last settlement of state .* \(2024-06-05T06:30:00\+08:00\)"):
        _run(days, "refused-3", [late], [], state=copy)
    assert _read(copy, "manifest.json") == manifest
    # A day the state has already: every settlement a replay of its first use, judged once, so the
    # leads stay the first run's.
    same = _run(days, "same-day-again", lines[-2:-1], iss[-2:-1], state=copy)
    assert _read(same, "leads.csv") == _read(duck[1], "leads.csv")
    assert json.loads(_read(copy, "manifest.json"))["generation"] == 2
    # And the state still serves: the new day after these gives the full run's leads.
    again = _run(days, "after-refusals", lines[-1:], iss[-1:], state=copy)
    for name in ("leads.csv", "evidence.csv"):
        assert _read(again, name) == _read(duck[0], name), name


def test_a_failed_run_leaves_the_state_as_it_was(days, duck, tmp_path):
    base, lines, iss, key, cfg = days
    copy = str(tmp_path / "state")
    shutil.copytree(duck[4], copy, ignore=shutil.ignore_patterns(".lock"))
    manifest = _read(copy, "manifest.json")
    # A half-written generation (as a run killed while saving leaves it) is not part of the state.
    m = json.loads(manifest)
    stale = os.path.join(copy, f"g{m['generation'] + 1:06d}", "flagged")
    os.makedirs(stale)
    with open(os.path.join(stale, "part-0.parquet"), "wb") as fh:
        fh.write(b"not parquet")
    assert _read(copy, "manifest.json") == manifest
    out = _run(days, "after-stale", lines[-1:], iss[-1:], state=copy)
    assert _read(out, "evidence.csv") == _read(duck[0], "evidence.csv")


def test_incremental_equals_full_on_spark(days, spark, duck):
    full, first, incr, *_ = spark
    _assert_same(full, incr, days[1][-1])
    # And the same as DuckDB's.
    assert _read(full, "leads.csv") == _read(duck[0], "leads.csv")


def test_a_state_is_read_by_the_other_engine(days, spark, duck, tmp_path):
    """The state is engine-neutral: the one Spark saved after the first days, resumed by DuckDB,
    gives DuckDB's full run's leads."""
    base, lines, iss, *_ = days
    copy = str(tmp_path / "state")
    shutil.copytree(spark[4], copy)
    assert json.loads(_read(copy, "manifest.json"))["generations"][0]["engine"] == "spark"
    out = _run(days, "duck-from-spark", lines[-1:], iss[-1:], "duckdb", state=copy)
    for name in ("leads.csv", "evidence.csv"):
        assert _read(out, name) == _read(duck[0], name), name


def test_the_ledger_adds_to_the_leads_it_has(days, console_env):
    """The first days' leads imported into the ledger, then the incremental run's: a lead of both
    runs is the same ledger lead (same lead_id), extended by the new evidence only; the new
    subjects are new leads."""
    from tracecode.console.ledger.intake import import_engine
    from tracecode.console.ledger.models import Evidence, Lead
    base, lines, iss, *_ = days
    pz = Pseudonymizer.from_file(console_env.key_file)  # the deployment's key, as the console has it
    state = str(base / "ledger-state")
    first = _run(days, "ledger-first", lines[:-1], iss[:-1], state=state, pz=pz)
    incr = _run(days, "ledger-incr", lines[-1:], iss[-1:], state=state, pz=pz)

    def by_lead(out):
        with open(os.path.join(out, "evidence.csv"), newline="", encoding="utf-8") as fh:
            ev: dict[str, set] = {}
            for r in csv.DictReader(fh):
                ev.setdefault(r["lead_id"], set()).add(tuple(r.values()))
        return ev
    ev1, ev2 = by_lead(first), by_lead(incr)
    rep1 = import_engine(f"{first}/leads.csv", f"{first}/evidence.csv")
    assert not rep1.problems and rep1.leads_created == len(_leads(first))
    rep2 = import_engine(f"{incr}/leads.csv", f"{incr}/evidence.csv")
    assert not rep2.problems
    kept = set(ev1) & set(ev2)
    grown = {lid for lid in kept if ev2[lid] != ev1[lid]}
    assert grown and all(ev1[lid] <= ev2[lid] for lid in kept if lid.startswith(("RES", "SWA", "RIN")))
    assert rep2.leads_created == len(set(ev2) - set(ev1))
    assert rep2.leads_extended == len(grown) and rep2.unchanged == len(kept) - len(grown)
    for lid in ev2:
        lead = Lead.objects.get(hits__external=f"MODEL:{lid}")
        assert Evidence.objects.filter(lead=lead).count() == len(ev1.get(lid, set()) | ev2[lid])


def test_day_by_day_equals_the_full_run(days, duck):
    """Two days, then each further day added on its own: the leads of the full run, and the tail
    of STOCKPILING's window keeps only the generations a later window can reach (48 h here)."""
    base, lines, iss, *_ = days
    state = str(base / "daily-state")
    _run(days, "daily-0", lines[:2], iss[:2], state=state)
    for k in range(2, DAYS):
        out = _run(days, f"daily-{k}", lines[k:k + 1], iss[k:k + 1], state=state)
    for name in ("leads.csv", "evidence.csv"):
        assert _read(out, name) == _read(duck[0], name), name
    m = json.loads(_read(state, "manifest.json"))
    assert [g["gen"] for g in m["generations"]] == [1, 2, 3, 4]
    live = [g["gen"] for g in m["generations"] if os.path.isdir(os.path.join(state, g["dir"], "tail"))]
    assert live == [3, 4]  # day 1 and day 2 end more than 48 h before the last settlement
