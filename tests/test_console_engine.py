"""The leads engine's real output into the ledger: `tracecode leads` over a synthetic history
(raw insured ids, pseudonymised with the deployment's key), then its CSV and Parquet files
imported: one ledger lead per engine lead, the evidence line for line, twice changes nothing,
the same person under the same pseudonym as the console computes."""
from __future__ import annotations

import csv
import subprocess
import sys

from console_support import http, make_user


def _engine_output(tmp_path, key_file):
    from tracecode.leads import synth
    h = synth.history(3000, seed=18)
    iss = synth.write_csv(str(tmp_path / "issuance.csv"), h.issuance, synth.ISSUANCE_COLUMNS)
    files = [synth.write_csv(str(tmp_path / f"s{i}.csv"), rows, synth.SETTLEMENT_COLUMNS)
             for i, rows in enumerate(h.files)]
    sites = synth.write_csv(str(tmp_path / "sites.csv"), h.sites, ["site_id", "site_kind", "region", "name"])
    out = str(tmp_path / "leads-out")
    run = subprocess.run([sys.executable, "-m", "tracecode.cli", "leads", *files, "--issuance", iss,
                          "--sites", sites, "--out", out, "--pseudonym-key", key_file, "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, sites, h


def test_engine_output_imports_lead_for_lead(console_env, tmp_path):
    from tracecode.console.ledger.intake import import_engine, import_sites, pseudonymizer
    from tracecode.console.ledger.models import Evidence, Lead
    out, sites, h = _engine_output(tmp_path, console_env.key_file)
    with open(f"{out}/leads.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(f"{out}/evidence.csv", encoding="utf-8") as fh:
        ev = list(csv.DictReader(fh))
    assert rows and ev, "the synthetic history should give leads"
    import_sites(sites)
    rep = import_engine(f"{out}/leads.csv", f"{out}/evidence.csv")
    assert not rep.problems and not rep.warnings, (rep.problems[:3], rep.warnings[:3])
    # The engine's lead ids are per model and subject: every one is its own ledger lead.
    assert rep.leads_created == len(rows)
    subjects = {(r["model"], r["subject_kind"], r["subject_id"]) for r in rows}
    mine = Lead.objects.filter(hits__external__in=[f"MODEL:{r['lead_id']}" for r in rows]).distinct()
    assert {(m.model, m.subject_kind, m.subject_id) for m in mine} == subjects
    assert Evidence.objects.filter(lead__in=mine).count() == len(ev)
    by_id = {r["lead_id"]: r for r in rows}
    for lead in mine:
        ext = lead.hits.get().external.removeprefix("MODEL:")
        assert lead.lines == int(by_id[ext]["lines"]) and lead.packs == int(by_id[ext]["packs"])
        # The console keeps the engine's Chinese summary and the version's status (issue 27).
        assert lead.summary == by_id[ext]["summary"] and any("\u4e00" <= ch <= "\u9fff" for ch in lead.summary)
        assert lead.model_status == by_id[ext]["model_status"] == "PRODUCTION"
    # The same files again, and the Parquet twins: nothing changes.
    before = sorted(Evidence.objects.filter(lead__in=mine).values_list("id", "key"))
    assert import_engine(f"{out}/leads.csv", f"{out}/evidence.csv").unchanged == len(rows)
    assert import_engine(f"{out}/leads.parquet", f"{out}/evidence.parquet").unchanged == len(rows)
    assert sorted(Evidence.objects.filter(lead__in=mine).values_list("id", "key")) == before
    # One person, one pseudonym: the engine's pseudonym of a raw id in the input is the console's,
    # so searching by that raw id finds the person's evidence.
    persons = {e["insured_id"] for e in ev if e["insured_id"]}
    raw = next(r["insured_id"] for rows_ in h.files for r in rows_
               if r.get("insured_id") and pseudonymizer().pseudonym(r["insured_id"]) in persons)
    sup = make_user("supervisor")
    body = http(sup).post("/search/person", {"insured_id": raw}, follow=True).content.decode()
    found = Lead.objects.filter(evidence__insured_pseudonym=pseudonymizer().pseudonym(raw)).distinct()
    assert found and all(lead.ref in body for lead in found) and raw not in body


def test_a_neutralised_cell_of_the_engine_comes_back_as_it_was(console_env, tmp_path):
    """The engine writes a region starting with '=' as "'=..." (rules/cells.py: no live formula in
    a spreadsheet); the console reads it back as the engine had it."""
    from tracecode.console.ledger.intake import import_engine
    from tracecode.console.ledger.models import Lead
    from tracecode.leads import synth
    h = synth.history(3000, seed=18)
    evil = '=HYPERLINK("http://e.x/","x")'  # within the region's 32 characters
    for s in h.sites:
        s["region"] = evil
    iss = synth.write_csv(str(tmp_path / "issuance.csv"), h.issuance, synth.ISSUANCE_COLUMNS)
    files = [synth.write_csv(str(tmp_path / f"s{i}.csv"), rows, synth.SETTLEMENT_COLUMNS)
             for i, rows in enumerate(h.files)]
    sites = synth.write_csv(str(tmp_path / "sites.csv"), h.sites, ["site_id", "site_kind", "region", "name"])
    out = str(tmp_path / "leads-out")
    run = subprocess.run([sys.executable, "-m", "tracecode.cli", "leads", *files, "--issuance", iss,
                          "--sites", sites, "--out", out, "--pseudonym-key", console_env.key_file, "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    with open(f"{out}/leads.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["region"] for r in rows if r["region"]} == {"'" + evil}  # neutralised in the file an inspector may open
    # Subjects of their own (the ledger keeps one open lead per subject, and the other test's
    # history has these sites), the cells exactly as the engine wrote them.
    mine = [dict(r, lead_id="N" + r["lead_id"], subject_id="NEUT-" + r["subject_id"]) for r in rows
            if r["region"] and r["subject_kind"] == "SITE"]
    with open(f"{out}/mine.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(mine)
    rep = import_engine(f"{out}/mine.csv")
    assert not rep.problems, rep.problems[:3]
    leads = Lead.objects.filter(subject_id__startswith="NEUT-")
    assert leads.count() == len(mine) > 0 and set(leads.values_list("region", flat=True)) == {evil}
