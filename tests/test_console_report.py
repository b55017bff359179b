"""The weekly report (周报表) of a generated ledger against an independent count in the test:
distinct institutions per action and kind, persons, batches; the XLSX cells downloaded over HTTP;
a submitted report frozen with its hash whatever the ledger does afterwards."""
from __future__ import annotations

import io
import time
import random
from collections import defaultdict
from datetime import date, timedelta
from decimal import Decimal

from console_support import http, make_user, unique


def _this_monday() -> date:
    from django.utils import timezone
    today = timezone.localdate()
    return today - timedelta(days=today.weekday())


def _site_lead(site, region, sup, ins):
    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
    from tracecode.console.ledger.rules import Source
    lead = arrive(LeadFacts(Source.MODEL, "RESALE_BUYER", "SITE", site, region=region), f"T:{site}", [], ImportReport())
    workflow.assign(lead, ins, sup)
    return workflow.transition(lead, workflow.Status.CONFIRMED, ins, "属实", "FRAUD_RESALE")


def test_weekly_report_equals_an_independent_count(console_env, tmp_path):
    from django.conf import settings
    from openpyxl import load_workbook

    from tracecode.console.ledger import gateway, report, workflow
    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive, import_sites
    from tracecode.console.ledger.models import Batch
    from tracecode.console.ledger.rules import ACTION_TYPES, Party, Source, Status
    from tracecode.server.store import free_port

    # The current week: sanctions are decided today and closures happen now, and the report
    # counts them as the ledger stands at the week's end.
    WEEK = _this_monday()
    settings.TRACECODE_SERVER = f"127.0.0.1:{free_port()}"  # nothing there: sanction calls stay owed
    gateway.reset_client()
    rnd = random.Random(18)
    region = unique("R")
    sup, ins = make_user("supervisor"), make_user("inspector")
    kinds = {}
    rows = ["site_id,site_kind,region,name"]
    for i in range(14):
        s = unique("S")
        kinds[s] = rnd.choice(["PHARMACY", "INSTITUTION", ""])
        if kinds[s]:
            rows.append(f"{s},{kinds[s]},{region},机构{i}")
    sites_csv = tmp_path / "sites.csv"
    sites_csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    import_sites(str(sites_csv))
    leads = {s: _site_lead(s, region, sup, ins) for s in kinds}

    # Institution actions, some outside the week (must not count), several per site and code.
    expected_inst = defaultdict(set)            # (code, kind) -> sites
    expected_money = defaultdict(Decimal)       # (code, figure, kind) -> 万元
    plain = [a for a in ACTION_TYPES if a.party == Party.INSTITUTION and not a.sanction]
    for _ in range(60):
        s, at = rnd.choice(list(kinds)), rnd.choice(plain)
        day = WEEK + timedelta(days=rnd.randrange(-3, 9))
        amount = Decimal(rnd.randrange(1, 5000)) / 100 if at.money else None
        workflow.record_action(leads[s], workflow.ActionInput(at.code, s, day, amount_wan=amount), ins)
        if WEEK <= day <= WEEK + timedelta(days=6):
            expected_inst[(at.code, kinds[s])].add(s)
            if at.money:
                expected_money[(at.code, "amount_wan", kinds[s])] += amount
    # Sanction actions go through two people (the service is away: the calls stay owed).
    for s in rnd.sample(list(kinds), 5):
        turnover = Decimal(rnd.randrange(100, 900)) / 10
        req = workflow.propose_sanction(leads[s], workflow.SanctionProposal(
            "SUSPEND_SERVICE", s, "回流药", monthly_turnover_wan=turnover, violation_wan=Decimal("1.50"),
            confiscated_wan=Decimal("0.25")), ins)
        req = workflow.approve_sanction(req, sup)
        req = gateway.deliver(req)
        assert req.call == "SET" and req.attempts == 1 and "UNAVAILABLE" in req.last_error  # kept, not lost
        expected_inst[("SUSPEND_SERVICE", kinds[s])].add(s)  # decided today: counted in today's week
        expected_money[("SUSPEND_SERVICE", "monthly_turnover_wan", kinds[s])] += turnover
        expected_money[("SUSPEND_SERVICE", "violation_wan", kinds[s])] += Decimal("1.50")
        expected_money[("SUSPEND_SERVICE", "confiscated_wan", kinds[s])] += Decimal("0.25")

    # Persons.
    expected_persons = defaultdict(set)
    recovered = Decimal(0)
    person_plain = [a for a in ACTION_TYPES if a.party == Party.PERSON and not a.sanction]
    persons = []
    for _ in range(6):
        p = f"k1.{rnd.getrandbits(128):032x}"
        lead = arrive(LeadFacts(Source.MODEL, "STOCKPILING", "INSURED", p, region=region), f"T:{p}", [], ImportReport())
        workflow.assign(lead, ins, sup)
        persons.append(workflow.transition(lead, Status.CONFIRMED, ins, "属实", "FRAUD_STOCKPILING"))
    for _ in range(15):
        lead, at = rnd.choice(persons), rnd.choice(person_plain)
        amount = Decimal(rnd.randrange(1, 999)) / 100 if at.money else None
        workflow.record_action(lead, workflow.ActionInput(at.code, "", WEEK + timedelta(days=rnd.randrange(7)),
                                                          amount_wan=amount), ins)
        expected_persons[at.code].add(lead.subject_id)
        if at.money:
            recovered += amount

    # Batches: received, closed, confirmed (fraud only; a technical cause is not 查证属实).
    expected_batches = {}
    for b_i, src in enumerate([Source.NATIONAL, Source.PROVINCIAL, Source.COMPLAINT]):
        batch = Batch.objects.create(source=src.value, number=unique("B"), received_on=WEEK - timedelta(days=b_i))
        got = closed = confirmed = 0
        for _ in range(rnd.randrange(3, 7)):
            s = unique("BS")
            lead = arrive(LeadFacts(src, src.value, "SITE", s, region=region, batch=batch), f"TB:{s}", [], ImportReport())
            got += 1
            fate = rnd.choice(["open", "fraud", "tech", "fraud_closed", "tech_closed"])
            if fate == "open":
                continue
            workflow.assign(lead, ins, sup)
            if fate.startswith("fraud"):
                lead = workflow.transition(lead, Status.CONFIRMED, ins, "属实", "FRAUD_OTHER")
                confirmed += 1
            else:
                lead = workflow.transition(lead, Status.UNFOUNDED, ins, "重复扫码", "TECH_DOUBLE_SCAN")
            if fate.endswith("closed"):
                workflow.set_handling_report(lead, "处理报告", ins)
                workflow.transition(lead, Status.CLOSED, sup, "办结")
                closed += 1
        expected_batches[batch.number] = (got, closed, confirmed)

    content = report.build(region, WEEK)
    kinds_order = report.KINDS
    for row in content["institutions"]:
        for k in kinds_order:
            want = len(expected_inst[(row["code"], k)])
            assert row["counts"][k] == want, (row["code"], k)
    all_sites = defaultdict(set)
    for (_code, k), sites in expected_inst.items():
        all_sites[k] |= sites
    assert content["institution_total"]["counts"] == {k: len(all_sites[k]) for k in kinds_order}
    for row in content["institutions"]:
        for figure, byk in row["money"].items():
            for k in kinds_order:
                want = expected_money[(row["code"], figure, k)]
                assert Decimal(byk[k]) == Decimal(want).quantize(Decimal("0.01")), (row["code"], figure, k)
    assert {r["code"]: r["persons"] for r in content["persons"]} == {
        a.code: len(expected_persons[a.code]) for a in ACTION_TYPES if a.party == Party.PERSON}
    assert content["person_total"]["persons"] == len(set().union(*expected_persons.values()))
    assert Decimal(content["person_total"]["amount_wan"]) == recovered.quantize(Decimal("0.01"))
    assert {b["number"]: (b["received"], b["closed"], b["confirmed"]) for b in content["batches"]} == expected_batches
    assert content["remarks"]["辖区定点医药机构数"] == str(sum(1 for k in kinds.values() if k))

    # The same figures in the spreadsheet, downloaded over HTTP, in the bureau's three sheets.
    c = http(sup)
    r = c.get(f"/reports/weekly.xlsx?region={region}&week={WEEK}")
    assert r.status_code == 200
    wb = load_workbook(io.BytesIO(r.content))
    assert wb.sheetnames == list(report.SHEET_TITLES)
    ws = wb[report.SHEET_TITLES[0]]
    labels = {ws.cell(row=i, column=2).value: i for i in range(3, ws.max_row + 1)}
    assert "合计（不重复数）" in labels
    for row in content["institutions"] + [content["institution_total"]]:
        i = labels[row["label"]]
        assert [ws.cell(row=i, column=3 + j).value for j in range(3)] == [row["counts"][k] for k in kinds_order]
    ws3 = wb[report.SHEET_TITLES[2]]
    got = {ws3.cell(row=i, column=3).value: tuple(ws3.cell(row=i, column=c_).value for c_ in (5, 6, 7))
           for i in range(3, ws3.max_row) if ws3.cell(row=i, column=3).value}
    assert got == expected_batches

    # Submitted: frozen. A later action in the same week changes the live report, not the snapshot.
    r = c.post("/reports/weekly/submit", {"region": region, "week": WEEK.isoformat()})
    assert r.status_code == 302
    from tracecode.console.ledger.models import ReportSnapshot
    snap = ReportSnapshot.objects.get(region=region, week_start=WEEK)
    frozen = c.get(f"/reports/snapshots/{snap.pk}.xlsx").content
    time.sleep(1.1)  # the file must not depend on when it is written (zip entry times)
    s = next(iter(kinds))
    workflow.record_action(leads[s], workflow.ActionInput("RECOVER_FUND", s, WEEK + timedelta(days=1),
                                                                amount_wan=Decimal("1.00")), ins)
    assert report.build(region, WEEK) != content
    assert c.get(f"/reports/snapshots/{snap.pk}.xlsx").content == frozen
    assert report.sha256(report.snapshot_content(snap)) == snap.sha256
    assert c.post("/reports/weekly/submit", {"region": region, "week": WEEK.isoformat()}, follow=True).status_code == 200
    assert ReportSnapshot.objects.filter(region=region).count() == 1
    assert http(ins).post("/reports/weekly/submit", {"region": region, "week": (WEEK + timedelta(days=7)).isoformat()}).status_code == 403
