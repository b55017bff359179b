"""The console in a real Chromium (Debian's, driven by Playwright; no browser download) against
the console running as its own process on the test PostgreSQL, and a real tracecode server:
log in, filter, open a lead, assign, confirm, propose and approve a suspension -> a VerifyDispense
of that site over real gRPC is refused within 1 s -> lift (proposed and approved) -> accepted;
download the weekly report and check its cells. Screenshots of the list, the lead and the report
are saved under tests/artifacts/ (the path is printed)."""
from __future__ import annotations

import contextlib
import io
import os
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import grpc
import pytest
from console_support import ConsoleProcess, artifacts_dir, make_user, unique
from factories import cn20, issuance, load

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.v1 import verification_pb2 as pb

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def chromium():
    """Playwright's sync API runs an event loop in this thread, where Django refuses ORM calls:
    the test sets the ledger up first, then opens the browser."""
    from playwright.sync_api import sync_playwright
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: install Debian's chromium (bash scripts/test does, scripts/system-deps.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def console(console_env, service):
    proc = ConsoleProcess(console_env, service.target).start()
    try:
        yield proc
    finally:
        proc.stop()


def _login(page, console, user):
    page.goto(console.url + "/login/")
    page.fill("input[name=username]", user.username)
    page.fill("input[name=password]", user.raw_password)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#leads")


def _logout(page):
    page.click("header form button[type=submit]")
    page.wait_for_selector("#login")


def _verify(pos, site, code):
    """'OK' or the refusal's status code name."""
    try:
        r = pos.verify(site, [line(code, "P1")])
        return pb.Verdict.Name(r.results[0].verdict)
    except grpc.RpcError as exc:
        return exc.code().name


def _until(pos, site, codes, want, within_s):
    """Call VerifyDispense of `site` (a fresh pack each time) until it answers `want`; the time it took."""
    t0 = time.monotonic()
    while True:
        got = _verify(pos, site, codes.pop())
        elapsed = time.monotonic() - t0
        if got == want:
            return elapsed
        assert elapsed < within_s, f"VerifyDispense of {site} still {got} after {elapsed:.2f} s (want {want})"
        time.sleep(0.02)


def test_browser_suspend_refuses_at_the_counter_then_lift(console_env, service, console, tmp_path):

    from tracecode.console.ledger.intake import import_engine, import_sites
    shots = artifacts_dir()
    print(f"\nscreenshots: {shots}")
    region = unique("R")
    site, other = unique("PH"), unique("PH")
    (tmp_path / "sites.csv").write_text(f"site_id,site_kind,region,name\n{site},PHARMACY,{region},一号药店\n"
                                        f"{other},PHARMACY,{region},二号药店\n", encoding="utf-8")
    import_sites(str(tmp_path / "sites.csv"))
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "lead_id,model,model_version,subject_kind,subject_id,region,window_start,window_end,score,risk,packs,lines,amount,summary\n"
        f"{unique('L')},RESALE_BUYER,1,SITE,{site},{region},2024-05-06T10:00:00+08:00,2024-05-07T10:00:00+08:00,5,HIGH,3,6,,"
        f"{site} 销售了 3 盒已在他处销售的药品\n"
        f"{unique('L')},SWAP,1,SITE,{other},{region},2024-05-06T10:00:00+08:00,2024-05-07T10:00:00+08:00,1,LOW,3,3,,"
        f"{other} 串换药品 3 行\n", encoding="utf-8")
    sup, sup2, ins = make_user("supervisor"), make_user("supervisor"), make_user("inspector")

    admin = AdminClient(service.target)
    codes = [cn20() for _ in range(60)]
    load(admin, *(issuance(c, "P1") for c in codes))
    admin.close()
    pos = PosClient(service.target, deadline_s=5, retries=0)
    # Three packs sold first elsewhere, then at the site: the evidence the lead carries, and the
    # packs' live histories (GetCodeHistory) the lead page shows with the resale chain.
    first = unique("FIRST")
    evidence = ["lead_id,role,site_id,settlement_id,line_no,settled_at,canonical_code,product_id,insured_id,amount"]
    lead_id = leads.read_text(encoding="utf-8").splitlines()[1].split(",")[0]
    for i in range(3):
        c = codes.pop()
        assert _verify(pos, first, c) == "OK" and _verify(pos, site, c) == "DUPLICATE"
        evidence += [f"{lead_id},first,{first},a{i},1,2024-05-06T10:0{i}:00+08:00,{c},P1,,20.00",
                     f"{lead_id},later,{site},b{i},1,2024-05-07T10:0{i}:00+08:00,{c},P1,,20.00"]
    (tmp_path / "evidence.csv").write_text("\n".join(evidence) + "\n", encoding="utf-8")
    assert import_engine(str(leads), str(tmp_path / "evidence.csv")).leads_created == 2
    assert _verify(pos, site, codes.pop()) == "OK"  # before: the site settles

    with chromium() as browser:
        _flow(browser, console, pos, codes, sup, sup2, ins, site, other, region, shots)
    pos.close()
    for name in ("console-list.png", "console-lead.png", "console-report.png"):
        assert os.path.getsize(os.path.join(shots, name)) > 10_000


def _flow(browser, console, pos, codes, sup, sup2, ins, site, other, region, shots):
    from openpyxl import load_workbook
    page = browser.new_page(locale="zh-CN", viewport={"width": 1400, "height": 1000})
    _login(page, console, sup)
    # Filter: the model narrows the list to our lead.
    page.select_option("select[name=region]", region)
    page.select_option("select[name=model]", "RESALE_BUYER")
    page.click("#filters button[type=submit]")
    page.wait_for_load_state()
    rows = page.locator("#leads tbody tr")
    assert rows.count() == 1 and site in rows.first.inner_text()
    page.screenshot(path=os.path.join(shots, "console-list.png"), full_page=True)
    rows.first.locator("a").click()
    page.wait_for_selector("#summary")
    ref = page.locator("h1").inner_text().split()[1]
    page.select_option("#assign-form select[name=assignee]", label=ins.username)
    page.click("#assign-form button[type=submit]")
    page.wait_for_selector("text=已分派给")
    assert page.locator("#lead-status").inner_text() == "核查中"
    _logout(page)

    # The inspector confirms and proposes the suspension.
    _login(page, console, ins)
    page.click(f"text={ref}")
    page.wait_for_selector("#to-CONFIRMED")
    page.select_option("#to-CONFIRMED select[name=cause]", "FRAUD_RESALE")
    page.fill("#to-CONFIRMED input[name=reason]", "回流药查证属实")
    page.click("#to-CONFIRMED button[type=submit]")
    page.wait_for_selector("#propose-form")
    assert page.locator("#lead-status").inner_text() == "查证属实"
    page.select_option("#propose-form select[name=action_code]", "SUSPEND_SERVICE")
    page.fill("#propose-form input[name=monthly_turnover_wan]", "12.5")
    page.fill("#propose-form input[name=reason]", "销售回流药品")
    page.click("#propose-form button[type=submit]")
    page.wait_for_selector("text=待另一名审核人批准")
    assert page.locator("form.approve").count() == 0  # an inspector is offered no approval
    _logout(page)

    # A supervisor approves: the console calls SetSanction; the counter refuses within 1 s.
    _login(page, console, sup)
    page.goto(f"{console.url}/leads/{ref}/")
    page.click("form.approve button[type=submit]")
    page.wait_for_selector("text=已下发结算服务")
    refused_after = _until(pos, site, codes, "FAILED_PRECONDITION", 1.0)
    print(f"VerifyDispense refused {refused_after:.3f} s after the approval page answered")
    assert _verify(pos, other, codes.pop()) == "OK"  # only that site
    page.reload()
    assert page.locator("tr.sanction .service-state").inner_text().strip() == "生效中"
    page.screenshot(path=os.path.join(shots, "console-lead.png"), full_page=True)
    _logout(page)

    # Lifting: proposed by the inspector, approved by a supervisor; the counter accepts again.
    _login(page, console, ins)
    page.goto(f"{console.url}/leads/{ref}/")
    page.fill("form.lift input[name=reason]", "已整改")
    page.click("form.lift button[type=submit]")
    page.wait_for_selector("text=已提议解除")
    _logout(page)
    _login(page, console, sup2)
    page.goto(f"{console.url}/leads/{ref}/")
    page.click("form.lift-approve button[type=submit]")
    page.wait_for_selector("text=已下发结算服务")
    accepted_after = _until(pos, site, codes, "OK", 1.0)
    print(f"VerifyDispense accepted {accepted_after:.3f} s after the lift was approved")
    page.reload()
    assert page.locator("tr.sanction .sanction-state").inner_text().strip() == "已解除"
    assert page.locator("tr.sanction .service-state").inner_text().strip() == "未生效"

    # The weekly report: the page, then the XLSX download and its cells.
    page.goto(f"{console.url}/reports/weekly/")
    page.fill("input[name=region]", region)
    page.fill("input[name=week]", datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat())
    page.click("#report-form button[type=submit]")
    page.wait_for_selector("#sheet1")
    page.screenshot(path=os.path.join(shots, "console-report.png"), full_page=True)
    with page.expect_download() as dl:
        page.click("#download")
    data = open(dl.value.path(), "rb").read()
    wb = load_workbook(io.BytesIO(data))
    ws = wb["（一）定点服务机构"]
    row = next(r for r in ws.iter_rows(min_row=3) if r[1].value == "暂停医保服务")
    header = [c.value for c in ws[2]]
    assert row[header.index("定点药店（家）")].value == 1
    assert row[header.index("定点医疗机构（家）")].value == 0
    assert row[header.index("月营业额（万元）·定点药店")].value == 12.5
    total = next(r for r in ws.iter_rows(min_row=3) if r[1].value == "合计（不重复数）")
    assert total[header.index("定点药店（家）")].value == 1
