"""The models' effectiveness (issue 27, deliverables 1 and 3) on a real PostgreSQL: a ledger built
through the console's own import and workflow, its page, CSV, XLSX and Prometheus figures held to
a count the test makes from what it did; pilot leads marked and counted apart; roles and bad
filters refused clearly."""
from __future__ import annotations

import csv
import io
import random
import re
import statistics
import urllib.request
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

from console_support import http, make_user, unique

# model, version, status as leads.csv carries them
MODELS = [("RESALE_BUYER", "1", "PRODUCTION", "SITE"), ("SWAP", "1", "PRODUCTION", "SITE"),
          ("STOCKPILING", "2", "PILOT", "INSURED")]
FATES = ("new", "working", "fraud", "tech", "clean", "fraud_closed", "tech_closed", "sent_back")
FIELDS = ("lead_id", "model", "model_version", "subject_kind", "subject_id", "region", "window_start", "window_end",
          "score", "risk", "packs", "lines", "amount", "summary", "summary_en", "model_status")


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _import(sup, rows: list[dict]):
    r = http(sup).post("/import/", {"kind": "engine", "leads": io.BytesIO(_csv(rows))}, follow=True)
    assert r.status_code == 200
    return r.content.decode()


def _lead_row(model, version, status, kind, subject, region, amount):
    return {"lead_id": unique("E-"), "model": model, "model_version": version, "subject_kind": kind,
            "subject_id": subject, "region": region, "window_start": "", "window_end": "", "score": "5",
            "risk": "MEDIUM", "packs": "1", "lines": "1", "amount": amount, "summary": "机构 x 销售了 1 盒",
            "summary_en": "Site x sold 1 pack", "model_status": status}


def _prev_month_start():
    from django.utils import timezone
    today = timezone.localdate()
    first = today.replace(day=1)
    return (first - timedelta(days=1)).replace(day=1)


def _page_rows(body: str) -> dict[str, dict[str, str]]:
    """The page's table: data-key -> the cells by class."""
    out = {}
    for key, cells in re.findall(r'<tr class="[^"]*" data-key="([^"]*)">(.*?)</tr>', body, re.S):
        out[key] = dict(re.findall(r'<td class="([a-z-]+)">([^<]*)</td>', cells))
    return out


def test_effectiveness_equals_an_independent_count(console_env):
    from django.utils import timezone
    from openpyxl import load_workbook
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.effect import Collector
    from tracecode.console.ledger.management.commands.metrics import serve
    from tracecode.console.ledger.models import Lead
    from tracecode.console.ledger.rules import Status

    rnd = random.Random(27)
    sup, ins, aud = make_user("supervisor"), make_user("inspector"), make_user("auditor")
    regions = [unique("ER"), unique("ER")]
    prev = _prev_month_start()
    now = timezone.now()
    months = [prev.strftime("%Y-%m"), timezone.localdate().strftime("%Y-%m")]

    # What the test does, lead by lead, to count from afterwards.
    plan = []
    rows = []
    for _ in range(48):
        model, version, status, kind = rnd.choice(MODELS)
        subject = unique("ES") if kind == "SITE" else f"k1.{rnd.getrandbits(128):032x}"
        region = rnd.choice(regions)
        amount = Decimal(rnd.randrange(100, 90000)) / 100
        rows.append(_lead_row(model, version, status, kind, subject, region, str(amount)))
        plan.append({"model": model, "version": version, "status": status, "kind": kind, "subject": subject,
                     "region": region, "amount": amount, "fate": rnd.choice(FATES), "recovered": Decimal(0),
                     "month": rnd.choice(months), "days": None, "repeat": False})
    # A repeat: a second lead (another model) on a subject the ledger has seen.
    seen = next(p for p in plan if p["kind"] == "SITE")
    other = "SWAP" if seen["model"] == "RESALE_BUYER" else "RESALE_BUYER"
    rows.append(_lead_row(other, "1", "PRODUCTION", "SITE", seen["subject"], seen["region"], "10.00"))
    plan.append({**seen, "model": other, "version": "1", "status": "PRODUCTION", "amount": Decimal("10.00"),
                 "fate": "fraud", "recovered": Decimal(0), "days": None, "repeat": True})
    body = _import(sup, rows)
    assert "导入" in body

    for p in plan:
        lead = Lead.objects.get(model=p["model"], subject_id=p["subject"])
        assert lead.model_status == p["status"]
        if p["fate"] == "new":
            p["lead"] = lead
            continue
        lead = workflow.assign(lead, ins, sup)
        if p["fate"] != "working":
            fraud = p["fate"].startswith("fraud") or p["fate"] == "sent_back"
            cause = {"STOCKPILING": "FRAUD_STOCKPILING", "SWAP": "FRAUD_SWAP"}.get(p["model"], "FRAUD_RESALE") \
                if fraud else ("TECH_DOUBLE_SCAN" if p["fate"].startswith("tech") else "NO_VIOLATION")
            lead = workflow.transition(lead, Status.CONFIRMED if fraud else Status.UNFOUNDED, ins, "核查", cause)
            if fraud and p["fate"] != "sent_back":
                for _ in range(rnd.randrange(0, 3)):
                    code = rnd.choice(["RECOVER_FUND", "INTERVIEW"] if p["kind"] == "SITE" else ["P_RECOVER", "P_INTERVIEW"])
                    amount = Decimal(rnd.randrange(1, 5000)) / 100 if code in ("RECOVER_FUND", "P_RECOVER") else None
                    workflow.record_action(lead, workflow.ActionInput(code, "", timezone.localdate(), amount_wan=amount), ins)
                    p["recovered"] += amount or 0
            if p["fate"] == "sent_back":
                lead = workflow.transition(lead, Status.IN_PROGRESS, sup, "证据不足，退回")
            if p["fate"].endswith("closed"):
                lead = workflow.transition(lead, Status.CLOSED, sup, "办结")
        p["lead"] = lead
    # The workflow stamps now; to have two months and known times to close, the test moves each
    # lead's opening (and closing) to a moment it chose.
    for p in plan:
        opened = timezone.make_aware(timezone.datetime.combine(
            prev if p["month"] == months[0] else timezone.localdate().replace(day=1), timezone.datetime.min.time())) \
            + timedelta(hours=rnd.randrange(1, 20))
        opened = min(opened, now)
        changes = {"created_at": opened}
        if p["fate"].endswith("closed"):
            hours = rnd.randrange(1, 24 * 40)
            changes["closed_at"] = opened + timedelta(hours=hours)
            p["days"] = hours / 24
        Lead.objects.filter(pk=p["lead"].pk).update(**changes)

    # The independent count: from the plan, not from the ledger's rules.
    confirmed_fates = {"fraud", "fraud_closed"}
    concluded_fates = {"fraud", "tech", "clean", "fraud_closed", "tech_closed"}

    def count(ps):
        concluded = [p for p in ps if p["fate"] in concluded_fates]
        confirmed = [p for p in ps if p["fate"] in confirmed_fates]
        days = [p["days"] for p in ps if p["days"] is not None]
        return {"opened": len(ps), "concluded": len(concluded), "confirmed": len(confirmed),
                "precision": f"{len(confirmed) / len(concluded):.4f}" if concluded else "-",
                "recovered": f"{sum((p['recovered'] for p in ps), Decimal(0)):.2f}",
                "confirmed-amount": f"{sum((p['amount'] for p in confirmed), Decimal(0)):.2f}",
                "median": str(round(statistics.median(days), 1)) if days else "-",
                "repeats": len({p["subject"] for p in ps if p["repeat"]})}

    groups = defaultdict(list)
    for p in plan:
        groups[f"{p['model']}|{p['version']}|{p['region']}|{p['month']}"].append(p)
    expected = {k: {c: str(v) for c, v in count(ps).items()} for k, ps in groups.items()}

    # The page (an auditor reads it), one region at a time (other tests share the database).
    for region in regions:
        r = http(aud).get(f"/reports/effectiveness/?region={region}")
        assert r.status_code == 200
        got = _page_rows(r.content.decode())
        want = {k: v for k, v in expected.items() if k.split("|")[2] == region}
        assert {k: v for k, v in got.items() if k.count("|") == 3} == want
        # Pilots apart: the production total has none of the pilot's leads, the pilot total all.
        mine = [p for p in plan if p["region"] == region]
        assert got["PRODUCTION"] == {c: str(v) for c, v in count([p for p in mine if p["status"] != "PILOT"]).items()}
        assert got["PILOT"] == {c: str(v) for c, v in count([p for p in mine if p["status"] == "PILOT"]).items()}
        assert "<svg" in r.content.decode() and "<script" not in r.content.decode()

    # Filters: one model, the previous month only.
    r = http(sup).get(f"/reports/effectiveness/?region={regions[0]}&model=RESALE_BUYER&month_from={months[0]}&month_to={months[0]}")
    got = {k: v for k, v in _page_rows(r.content.decode()).items() if k.count("|") == 3}
    assert got == {k: v for k, v in expected.items()
                   if k.startswith("RESALE_BUYER|") and k.endswith(f"|{regions[0]}|{months[0]}")}

    # The exports carry the same figures.
    r = http(sup).get(f"/reports/effectiveness.csv?region={regions[1]}")
    assert r.status_code == 200 and r["Content-Disposition"].endswith('.csv"')
    lines = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
    head = lines[0]
    by_key = {"|".join([ln[0], ln[1], ln[3], ln[4]]): dict(zip(head, ln)) for ln in lines[1:] if ln[4]}
    want = {k: v for k, v in expected.items() if k.split("|")[2] == regions[1]}
    assert set(by_key) == set(want)
    for k, v in want.items():
        row = by_key[k]
        assert (row["立案线索数"], row["已查结数"], row["查证属实数"], row["屡次出现主体数"]) == \
            (v["opened"], v["concluded"], v["confirmed"], v["repeats"]), k
        assert (f"{float(row['查证属实率']):.4f}" if row["查证属实率"] else "-") == v["precision"], k
        assert f"{Decimal(row['追回金额（万元）']):.2f}" == v["recovered"], k
        assert f"{Decimal(row['查实金额（元）']):.2f}" == v["confirmed-amount"], k
    r = http(sup).get(f"/reports/effectiveness.xlsx?region={regions[1]}")
    ws = load_workbook(io.BytesIO(r.content)).active
    xrows = [[c.value for c in row] for row in ws.iter_rows(min_row=3)]
    xkeys = {"|".join([x[0], x[1], x[3], x[4]]): x for x in xrows if x[4]}
    assert set(xkeys) == set(want)
    for k, v in want.items():
        assert [str(n) for n in xkeys[k][5:8]] == [v["opened"], v["concluded"], v["confirmed"]], k

    # Prometheus: the same figures, read from the ledger at the scrape, over HTTP.
    text = generate_latest(_registry(CollectorRegistry, Collector)).decode()
    server, thread = serve(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
    finally:
        server.shutdown()
    for body in (text, scraped):
        for k, v in expected.items():
            model, version, region, month = k.split("|")
            labels = f'model="{model}",month="{month}",region="{region}",status="{groups[k][0]["status"]}",version="{version}"'
            got_opened = re.search(rf"tracecode_console_model_opened\{{{re.escape(labels)}\}} (\S+)", body)
            assert got_opened and float(got_opened.group(1)) == float(v["opened"]), (k, labels)
            got_conf = re.search(rf"tracecode_console_model_confirmed\{{{re.escape(labels)}\}} (\S+)", body)
            assert got_conf and float(got_conf.group(1)) == float(v["confirmed"]), k


def _registry(CollectorRegistry, Collector):
    reg = CollectorRegistry()
    reg.register(Collector())
    return reg


def test_effectiveness_is_for_supervisors_and_auditors_and_refuses_bad_filters(console_env):
    ins, sup = make_user("inspector"), make_user("supervisor")
    assert http(ins).get("/reports/effectiveness/").status_code == 403
    assert http(ins).get("/reports/effectiveness.csv").status_code == 403
    assert "模型成效" not in http(ins).get("/").content.decode()
    assert "模型成效" in http(sup).get("/").content.decode()
    r = http(sup).get("/reports/effectiveness/?month_from=2026-13")
    assert r.status_code == 400 and "月份格式应为 YYYY-MM" in r.content.decode()
    r = http(sup).get("/reports/effectiveness/?month_from=2026-05&month_to=2026-04")
    assert r.status_code == 400 and "起始月份晚于截止月份" in r.content.decode()
    r = http(sup).get("/reports/effectiveness/?region=R%00")
    assert r.status_code == 400 and "筛选条件 region 含有不允许的字符" in r.content.decode()
    r = http(sup).get("/reports/effectiveness.xlsx?version=x1", follow=True)
    assert "版本应为数字" in r.content.decode()


def test_export_cells_are_neutralised(console_env):
    """A region that looks like a formula stays text in both exports."""
    from openpyxl import load_workbook
    sup = make_user("supervisor")
    region = "=HYPERLINK(1)" + unique("")
    _import(sup, [_lead_row("SWAP", "1", "PRODUCTION", "SITE", unique("ES"), region, "1.00")])
    from urllib.parse import quote
    r = http(sup).get(f"/reports/effectiveness.csv?region={quote(region)}")
    lines = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
    assert lines[1][3] == "'" + region
    r = http(sup).get(f"/reports/effectiveness.xlsx?region={quote(region)}")
    assert r.status_code == 200 and re.fullmatch(r'attachment; filename="[A-Za-z0-9._-]+"', r["Content-Disposition"])
    ws = load_workbook(io.BytesIO(r.content)).active
    cell = ws.cell(row=3, column=4)
    assert cell.value == "'" + region and cell.data_type == "s"


def test_pilot_leads_are_marked_and_counted_apart_in_the_weekly_report(console_env):
    from django.utils import timezone

    from tracecode.console.ledger import report, workflow
    from tracecode.console.ledger.models import Lead
    from tracecode.console.ledger.rules import Status

    sup, ins = make_user("supervisor"), make_user("inspector")
    region = unique("PR")
    pilot_site, prod_site = unique("PS"), unique("QS")
    old_style = _lead_row("SWAP", "1", "", "SITE", unique("OS"), region, "3.00")
    del old_style["model_status"], old_style["summary_en"]  # a file from before statuses: in use
    _import(sup, [_lead_row("SWAP", "2", "PILOT", "SITE", pilot_site, region, "5.00"),
                  _lead_row("RESALE_BUYER", "1", "PRODUCTION", "SITE", prod_site, region, "7.00")])
    _import(sup, [old_style])
    assert Lead.objects.get(subject_id=old_style["subject_id"]).model_status == "PRODUCTION"
    pilot, prod = Lead.objects.get(subject_id=pilot_site), Lead.objects.get(subject_id=prod_site)
    assert (pilot.model_status, prod.model_status) == ("PILOT", "PRODUCTION")

    # Marked on the list and the lead.
    listing = http(sup).get(f"/?region={region}").content.decode()
    row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*{pilot.ref}(?:(?!</tr>).)*</tr>", listing, re.S).group(0)
    assert "试点" in row
    prow = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*{prod.ref}(?:(?!</tr>).)*</tr>", listing, re.S).group(0)
    assert "试点" not in prow
    detail = http(sup).get(f"/leads/{pilot.ref}/").content.decode()
    assert re.search(r'id="model-status" class="badge pilot">试点<', detail)
    assert re.search(r'id="model-status" class="badge">在用<', http(sup).get(f"/leads/{prod.ref}/").content.decode())

    # An unknown status is refused with the row and the codes it may be; nothing is imported.
    bad_site = unique("BS")
    body = _import(sup, [_lead_row("SWAP", "1", "TRIAL", "SITE", bad_site, region, "1.00")])
    assert "model_status" in body and "PILOT, PRODUCTION, RETIRED" in body
    assert not Lead.objects.filter(subject_id=bad_site).exists()

    # Actions on both: the bureau's sheets count both (the actions were taken), the annex the pilot's part.
    today = report.week_of(timezone.localdate())
    for lead, amount in ((pilot, Decimal("2.50")), (prod, Decimal("4.00"))):
        lead = workflow.assign(lead, ins, sup)
        lead = workflow.transition(lead, Status.CONFIRMED, ins, "属实", "FRAUD_SWAP")
        workflow.record_action(lead, workflow.ActionInput("RECOVER_FUND", "", today, amount_wan=amount), ins)
    content = report.build(region, today)
    assert content["remarks"]["其中追回医保基金（万元）"] == "6.50"
    assert content["institution_total"]["counts"][""] == 2
    assert content["pilot"] == {"leads_opened": 1, "institutions": 1, "persons": 0, "recovered_wan": "2.50"}
    page = http(sup).get(f"/reports/weekly/?region={region}&week={today}").content.decode()
    assert "（附）试点模型线索" in page and re.search(r"本周新增试点线索</td><td>1<", page)
    # The bureau's spreadsheet keeps its three sheets.
    from openpyxl import load_workbook
    wb = load_workbook(io.BytesIO(http(sup).get(f"/reports/weekly.xlsx?region={region}&week={today}").content))
    assert wb.sheetnames == list(report.SHEET_TITLES)
