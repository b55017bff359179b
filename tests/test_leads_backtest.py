"""`tracecode leads backtest`: a stricter candidate beside the current configuration over one
history, with a ledger's conclusions whose answer is known: the confirmed subjects the stricter
threshold loses are exactly those whose score (packs resold, in the current run's own leads) is
below the new threshold; the unfounded ones it stops raising likewise; every other model is
unchanged. Bad conclusions files are refused naming file, line and field.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta

from tracecode.leads import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=synth.CST)
PRODUCT = "8300001"


def pseudonym(n: int) -> str:
    return f"k1.{n:032x}"


def history(tmp_path) -> tuple[str, str]:
    """Person n (1..6) has n packs resold at other sites: RESALE_SOURCE's score is n."""
    codes = synth.Codes(None)
    issuance, rows = [], []
    sale = 0
    for person in range(1, 7):
        for k in range(person):
            code = codes.cn20(PRODUCT)
            issuance.append({"code": code, "product_id": PRODUCT, "pack_units": ""})
            for site, person_id, days in ((f"S{person}", pseudonym(person), 0), (f"B{k % 3}", "", 3)):
                sale += 1
                when = T0 + timedelta(days=days + k, hours=person)
                rows.append({"site_id": site, "settlement_id": f"P{sale:06d}", "settled_at": when.isoformat(),
                             "line_no": "1", "code": code, "product_id": PRODUCT, "units": "",
                             "insured_id": person_id, "amount": "12.00"})
    lines = synth.write_csv(str(tmp_path / "lines.csv"), rows, list(rows[0]))
    iss = synth.write_csv(str(tmp_path / "issuance.csv"), issuance, ["code", "product_id", "pack_units"])
    return lines, iss


def leads(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracecode.cli", "leads", *args, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_a_stricter_threshold_reports_exactly_the_confirmed_leads_it_loses(tmp_path):
    lines, iss = history(tmp_path)
    (tmp_path / "candidate.toml").write_text("[RESALE_SOURCE]\nversion = 2\nmin_packs = 4\n")
    # The ledger: persons 2 and 5 proven (查证属实), 3 and 6 unfounded; 1 never raised (below
    # today's threshold of 2) but concluded confirmed from an earlier version's lead.
    concluded = {2: "CONFIRMED", 5: "CONFIRMED", 3: "UNFOUNDED", 6: "UNFOUNDED", 1: "CONFIRMED"}
    with open(tmp_path / "conclusions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["lead_id", "model", "model_version", "subject_kind", "subject_id", "finding", "cause"])
        for n, finding in concluded.items():
            w.writerow([f"RES-{n:020d}", "RESALE_SOURCE", "1", "INSURED", pseudonym(n), finding, "x"])
        w.writerow(["RES-x", "RESALE_BUYER", "1", "SITE", "B0", "CONFIRMED", "x"])
        w.writerow(["OLD-x", "RETIRED_LONG_AGO", "3", "SITE", "B1", "CONFIRMED", "x"])  # not the engine's
    out = tmp_path / "bt"
    p = cli("backtest", lines, "--issuance", iss, "--insured-pseudonymised", "--config",
            str(tmp_path / "candidate.toml"), "--conclusions", str(tmp_path / "conclusions.csv"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    current = leads(out / "current" / "leads.csv")
    candidate = leads(out / "candidate" / "leads.csv")
    # The independent count: from the current run's own scores and the new threshold.
    score = {ld["subject_id"]: float(ld["score"]) for ld in current if ld["model"] == "RESALE_SOURCE"}
    assert sorted(score.values()) == [2, 3, 4, 5, 6]
    expected_missed = sorted(pseudonym(n) for n, f in concluded.items() if f == "CONFIRMED"
                             and score.get(pseudonym(n), 0) < 4)
    expected_dropped = sorted(pseudonym(n) for n, f in concluded.items() if f == "UNFOUNDED"
                              and pseudonym(n) in score and score[pseudonym(n)] < 4)
    assert expected_missed == [pseudonym(1), pseudonym(2)] and expected_dropped == [pseudonym(3)]
    report = {m["model"]: m for m in json.loads((out / "backtest.json").read_text("utf-8"))["models"]}
    rs = report["RESALE_SOURCE"]
    assert rs["confirmed_missed_subjects"] == expected_missed and rs["confirmed_missed"] == 2
    assert rs["unfounded_dropped_subjects"] == expected_dropped and rs["unfounded_dropped"] == 1
    assert rs["dropped_subjects"] == sorted(s for s, v in score.items() if v < 4) and rs["added"] == 0
    assert (rs["current_version"], rs["candidate_version"]) == (1, 2)
    assert (rs["confirmed"], rs["confirmed_found_current"], rs["unfounded"]) == (3, 2, 2)
    assert {ld["subject_id"] for ld in candidate if ld["model"] == "RESALE_SOURCE"} == \
        {s for s, v in score.items() if v >= 4}
    # Every other model: the same subjects, nothing added or dropped; RESALE_BUYER's confirmed
    # site is still found.
    for model, r in report.items():
        if model != "RESALE_SOURCE":
            assert r["added"] == r["dropped"] == r["confirmed_missed"] == 0, model
            assert r["added_subjects"] == r["dropped_subjects"] == [], model
    assert report["RESALE_BUYER"]["confirmed_found_current"] == 1
    with open(out / "backtest.csv", newline="", encoding="utf-8") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert rows["RESALE_SOURCE"]["confirmed_missed"] == "2"
    assert "RESALE_SOURCE v1→v2" in p.stdout and "漏掉 2 个" in p.stdout
    assert "1 conclusion(s) of model 'RETIRED_LONG_AGO'" in p.stderr and "not compared" in p.stderr


def test_a_bad_conclusions_file_is_refused_naming_line_and_field(tmp_path):
    lines, iss = history(tmp_path)
    (tmp_path / "candidate.toml").write_text("[RESALE_SOURCE]\nmin_packs = 4\n")
    cases = {
        "lead_id,model,model_version,subject_id,finding\nX,RESALE_SOURCE,1,k1.x,MAYBE\n":
            "line 2: field finding",
        "lead_id,model,model_version,subject_id,finding\nX,,1,k1.x,CONFIRMED\n": "line 2: field model",
        "lead_id,model,subject_id\n": "line 1: header lacks model_version, finding",
    }
    for n, (text, says) in enumerate(cases.items()):
        path = tmp_path / f"c{n}.csv"
        path.write_text(text, encoding="utf-8")
        p = cli("backtest", lines, "--issuance", iss, "--insured-pseudonymised", "--config",
                str(tmp_path / "candidate.toml"), "--conclusions", str(path), "--out", str(tmp_path / f"o{n}"))
        assert p.returncode == 2 and says in p.stderr and str(path) in p.stderr, (says, p.stderr)
        assert "Traceback" not in p.stderr
        assert not (tmp_path / f"o{n}").exists()
    p = cli(lines, "--issuance", iss, "--conclusions", str(tmp_path / "c0.csv"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "backtest switches" in p.stderr
    p = cli("backtest", lines, "--issuance", iss, "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "--config" in p.stderr
