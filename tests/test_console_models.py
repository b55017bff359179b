"""The models' configuration through the ledger (issue 27, deliverable 2, console side), over the
console's HTTP stack on a real PostgreSQL: a candidate configuration is proposed with its
backtest report, shown with the report's figures, adopted only by a second person (never the
proposer, never an inspector or auditor), and the adopted TOML is what `tracecode console
models-config` hands the engine; a configuration the engine would refuse is refused at the door.
The conclusions export reads back through the backtest's own reader with the findings the
workflow gave (technical causes unfounded)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

from console_support import http, make_user, unique

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRICT = "[RESALE_SOURCE]\nversion = 2\nmin_packs = 4\n"


def _report() -> str:
    """A real backtest report (leads/backtest.py's own writer) for STRICT."""
    from tracecode.leads import backtest, config
    current = config.LeadsConfig()
    candidate = config.LeadsConfig(models={**current.models, "RESALE_SOURCE": dataclasses.replace(
        current.models["RESALE_SOURCE"], version=2)})
    reports = backtest.compare([("RESALE_SOURCE", "k1.a"), ("RESALE_SOURCE", "k1.b")], [("RESALE_SOURCE", "k1.b")],
                               current, candidate, [backtest.Conclusion("RESALE_SOURCE", "k1.a", "CONFIRMED")])
    return json.dumps({"models": [{**r.row(), **r.lists()} for r in reports]})


def _configs():
    from tracecode.console.ledger.models import ModelConfig
    return ModelConfig.objects


def test_adopting_a_configuration_needs_a_second_person(console_env, tmp_path):
    from tracecode.console.ledger.models import ModelConfig

    ins, sup, sup2, aud = make_user("inspector"), make_user("supervisor"), make_user("supervisor"), make_user("auditor")
    reason = unique("收紧阈值")
    r = http(ins).post("/models/propose", {"toml_file": io.BytesIO(STRICT.encode()), "reason": reason,
                                           "report_file": io.BytesIO(_report().encode())}, follow=True)
    assert r.status_code == 200 and "待另一名审核人批准" in r.content.decode()
    cfg = _configs().get(reason=reason)
    assert cfg.state == ModelConfig.PROPOSED and cfg.toml == STRICT

    page = http(sup).get("/models/").content.decode()
    assert f'id="config-{cfg.pk}"' in page and 'data-model="RESALE_SOURCE"' in page
    row = page.split(f'id="config-{cfg.pk}"')[1].split('data-model="RESALE_SOURCE"')[1].split("</tr>")[0]
    assert "v1→v2" in row and '<td class="confirmed-missed">1</td>' in row

    # Nobody adopts alone: the inspector may not approve at all, the auditor may not post,
    # and a supervisor's own proposal needs another supervisor.
    assert http(ins).post(f"/models/{cfg.pk}/adopt").status_code == 403
    assert http(aud).post(f"/models/{cfg.pk}/adopt").status_code == 403
    reason2 = unique("主管提议")
    http(sup).post("/models/propose", {"toml": STRICT.replace("4", "5"), "reason": reason2})
    own = _configs().get(reason=reason2)
    assert http(sup).post(f"/models/{own.pk}/adopt").status_code == 403
    cfg.refresh_from_db()
    own.refresh_from_db()
    assert cfg.state == own.state == ModelConfig.PROPOSED

    r = http(sup2).post(f"/models/{cfg.pk}/adopt", follow=True)
    assert "已生效" in r.content.decode()
    cfg.refresh_from_db()
    assert (cfg.state, cfg.decided_by_id) == (ModelConfig.ADOPTED, sup2.id)
    assert http(sup2).post(f"/models/{cfg.pk}/adopt", follow=True).status_code == 200  # decided: a message
    cfg.refresh_from_db()
    assert cfg.state == ModelConfig.ADOPTED
    got = http(aud).get("/models/adopted.toml")
    assert got.status_code == 200 and got.content.decode() == STRICT

    # What the engine's next run reads: the command writes the adopted TOML, which loads.
    out = tmp_path / "models.toml"
    p = subprocess.run([sys.executable, "-m", "tracecode.cli", "console", "models-config", "--out", str(out)],
                       cwd=ROOT, env={**os.environ, **console_env.env}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    from tracecode.leads.config import load
    assert out.read_text() == STRICT and load(str(out)).model("RESALE_SOURCE").params["min_packs"] == 4

    # The next adoption supersedes it; one in force at a time, both rows kept.
    assert http(sup2).post(f"/models/{own.pk}/adopt").status_code == 302
    cfg.refresh_from_db()
    own.refresh_from_db()
    assert (cfg.state, own.state) == (ModelConfig.SUPERSEDED, ModelConfig.ADOPTED)
    assert _configs().filter(state=ModelConfig.ADOPTED).count() == 1


def test_a_configuration_the_engine_would_refuse_is_refused(console_env):
    ins = make_user("inspector")
    before = _configs().count()
    for toml, says in (("[NOPE]\nx = 1\n", "unknown model"), ("[SWAP]\nmin_linez = 2\n", "no threshold"),
                       ("[SWAP\n", "配置无效"), ("[SWAP]\nmin_lines = 2 # \u202e\n", "U+202E")):
        r = http(ins).post("/models/propose", {"toml": toml, "reason": "试"}, follow=True, HTTP_REFERER="/models/")
        assert says in r.content.decode(), (toml, r.content.decode()[:2000])
        assert "Traceback" not in r.content.decode()
    r = http(ins).post("/models/propose", {"toml": "[SWAP]\nmin_lines = 2\n", "reason": "试",
                                           "report_file": io.BytesIO(b"{not json")}, follow=True)
    assert "backtest.json" in r.content.decode()
    assert _configs().count() == before


def test_the_conclusions_export_reads_back_through_the_backtest(console_env, tmp_path):
    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
    from tracecode.console.ledger.rules import Source, Status
    from tracecode.leads.backtest import read_conclusions

    sup, ins = make_user("supervisor"), make_user("inspector")
    fates = {unique("CS"): ("CONFIRMED", "FRAUD_RESALE", "CONFIRMED"),
             unique("CS"): ("UNFOUNDED", "TECH_DOUBLE_SCAN", "UNFOUNDED"),
             unique("CS"): ("UNFOUNDED", "NO_VIOLATION", "UNFOUNDED"),
             unique("CS"): (None, None, None)}  # still open: not exported
    for site, (to, cause, _) in fates.items():
        lead = arrive(LeadFacts(Source.MODEL, "RESALE_BUYER", "SITE", site), f"MODEL:E-{site}", [], ImportReport())
        if to:
            workflow.assign(lead, ins, sup)
            workflow.transition(lead, Status(to), ins, "核查", cause)
    r = http(sup).get("/models/conclusions.csv")
    assert r.status_code == 200
    path = tmp_path / "conclusions.csv"
    path.write_bytes(r.content)
    ignored: dict[str, int] = {}  # the shared test ledger holds other tests' leads of made-up models
    got = {c.subject_id: c.finding for c in read_conclusions(str(path), ignored) if c.subject_id in fates}
    assert got == {s: f for s, (_, _, f) in fates.items() if f}
    assert http(ins).get("/models/conclusions.csv").status_code == 403
