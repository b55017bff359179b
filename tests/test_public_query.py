"""The public code query (医保码上查, console/ledger/public.py) in a real Chromium with a phone's
screen, against the console as its own process, a real tracecode server and its Redis: a pack
sold, returned and sold again in another region shows "已售出 2 次" with the latest sale's date and
region and nothing of a site, a settlement or a person; a malformed code shows the codec's own
reason; the 61st query of a minute from one address is refused (HTTP 429, a Chinese message).
The JSON endpoint answers the same, and every query is counted in the console's metrics."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from console_support import ConsoleProcess, artifacts_dir, unique
from factories import cn20, issuance, load
from test_console_browser import chromium

from tracecode import codec
from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.v1 import verification_pb2 as pb

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True,
         "has_touch": True, "locale": "zh-CN"}


@pytest.fixture
def console(console_env, service):
    proc = ConsoleProcess(console_env, service.target).start()
    try:
        yield proc
    finally:
        proc.stop()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def counts() -> dict[str, float]:
    from tracecode.console.ledger.public import Collector
    return {s.labels["outcome"]: s.value for fam in Collector().collect() for s in fam.samples
            if s.name.endswith("_total")}


def _fresh_window():
    """This address's window starts at its next query (the suite shares one database)."""
    from tracecode.console.ledger.models import PublicQueryWindow
    PublicQueryWindow.objects.filter(address="127.0.0.1").delete()


def test_public_query_on_a_phone(console_env, service, console, tmp_path):
    from tracecode.console.ledger.intake import import_sites
    east, west = unique("东城区"), unique("西城区")
    site_a, site_b, buyer = unique("PHA"), unique("PHB"), unique("insured")
    (tmp_path / "sites.csv").write_text(f"site_id,site_kind,region,name\n{site_a},PHARMACY,{east},甲药店\n"
                                        f"{site_b},PHARMACY,{west},乙药店\n", encoding="utf-8")
    import_sites(str(tmp_path / "sites.csv"))
    twice, never = cn20(), cn20()
    with AdminClient(service.target) as admin:
        load(admin, issuance(twice, "P-QUERY", batch="B2405", expiry="2027-12-31", manufacturer="某某制药"),
             issuance(never, "P-QUERY", batch="B2406", expiry="2028-01-31"))
    with PosClient(service.target, deadline_s=5, retries=0) as pos:
        first = pos.verify(site_a, [line(twice, "P-QUERY")], settlement_id="S-A-1")
        assert first.results[0].verdict == pb.OK
        pos.reverse(site_a, "S-A-1", reason="顾客退货")
        again = pos.verify(site_b, [line(twice, "P-QUERY")], settlement_id="S-B-7")
        assert again.results[0].verdict == pb.OK
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat()
    bad = "8123456000000001234X"
    reason = codec.parse(bad)[codec.REASON]
    assert reason
    _fresh_window()
    before = counts()

    shots = artifacts_dir()
    with chromium() as browser:
        page = browser.new_page(**PHONE)
        page.goto(console.url + "/query/")
        assert "width=device-width" in page.locator("meta[name=viewport]").get_attribute("content")
        page.fill("#code", twice)
        page.click("#query-form button[type=submit]")
        page.wait_for_selector("#result")
        html = page.content()
        assert page.locator("#sold").inner_text() == "已售出 2 次（其中 1 次已退货）"
        assert page.locator("#latest-region").inner_text() == west
        assert page.locator("#latest-date").inner_text() == today
        assert page.locator("#batch").inner_text() == "B2405"
        assert page.locator("#expiry").inner_text() == "2027-12-31"
        for secret in (site_a, site_b, "S-A-1", "S-B-7", "甲药店", "乙药店", east, buyer):
            assert secret not in html, secret
        # A phone's screen: nothing wider than the viewport, the field and the button on it.
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        for sel in ("#code", "#query-form button[type=submit]", "#sold"):
            box = page.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 0.5, (sel, box)
        page.screenshot(path=os.path.join(shots, "public-query-phone.png"), full_page=True)

        page.fill("#code", never)
        page.click("#query-form button[type=submit]")
        page.wait_for_selector("#result")
        assert page.locator("#sold").inner_text() == "未在医保结算中售出"
        assert page.locator("#latest").count() == 0

        page.fill("#code", bad)
        page.click("#query-form button[type=submit]")
        page.wait_for_selector("#result[data-outcome=malformed]")
        assert reason in page.locator("#message").inner_text()
        assert page.locator("#message").inner_text().startswith("追溯码格式不正确")

        # The JSON endpoint: the same answer, no site, settlement or person anywhere in it.
        status, body = get(console.url + "/api/query?" + urllib.parse.urlencode({"code": twice}))
        assert status == 200
        assert body["insured_sales"] == {"sold": True, "times": 2, "returned": 1,
                                         "latest": {"date": today, "region": west}}
        assert body["issued"]["batch"] == "B2405" and body["issued"]["product_id"] == "P-QUERY"
        dumped = json.dumps(body, ensure_ascii=False)
        for secret in (site_a, site_b, "S-A-1", "S-B-7", east):
            assert secret not in dumped
        # One code per query, no wildcards: refused, not searched.
        status, body = get(console.url + "/api/query?code=" + twice + "&code=" + never)
        assert (status, body["message"]) == (400, "每次只能查询一个追溯码")
        status, body = get(console.url + "/api/query?" + urllib.parse.urlencode({"code": twice[:10] + "*"}))
        assert status == 400 and "通配符" in body["message"]

        # 6 queries so far in this window; up to 60 pass, the 61st is refused.
        t0 = time.perf_counter()
        for i in range(54):
            status, _ = get(console.url + "/api/query?" + urllib.parse.urlencode({"code": never}))
            assert status == 200, i
        print(f"\npublic query over HTTP (rate window, counter, GetCodeHistory): "
              f"{(time.perf_counter() - t0) / 54 * 1000:.1f} ms each, sequential")
        page.fill("#code", twice)
        with page.expect_response(lambda r: "/query/" in r.url) as resp:
            page.click("#query-form button[type=submit]")
        assert resp.value.status == 429
        assert int(resp.value.headers["retry-after"]) >= 1
        message = page.locator("#message").inner_text()
        assert message.startswith("查询过于频繁：每个网络地址每分钟最多查询 60 次，请") and message.endswith("秒后再试")
        assert page.locator("#sold").count() == 0
        page.screenshot(path=os.path.join(shots, "public-query-limited.png"), full_page=True)
        status, body = get(console.url + "/api/query?" + urllib.parse.urlencode({"code": never}))
        assert status == 429 and body["outcome"] == "limited"

    after = counts()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta == {"found": 57, "not_issued": 0, "malformed": 1, "refused": 2, "limited": 2, "unavailable": 0}


def test_public_query_page_needs_no_login_and_counts_nothing_without_a_code(console_env, service, console):
    before = counts()
    with urllib.request.urlopen(console.url + "/query/", timeout=10) as r:
        html = r.read().decode()
        assert r.status == 200 and "医保码上查" in html and 'name="viewport"' in html
    status, body = get(console.url + "/api/query")
    assert status == 400 and "追溯码" in body["message"]
    assert counts() == before


def test_every_scan_form_of_a_pack_is_the_same_pack(console_env, service, console):
    """The service's codec parses the query: a GS1 pack asked in its printed form (parentheses)
    and as a scanner sends it (symbology identifier, no parentheses) is one pack, sold once."""
    from factories import gs1, gtin14
    gtin = gtin14()
    code = gs1(gtin, serial=unique("SN"))
    serial = code.split("(21)")[1]
    with AdminClient(service.target) as admin:
        load(admin, issuance(code, "P-GS1", gtin=gtin, batch="L7"))
    with PosClient(service.target, deadline_s=5, retries=0) as pos:
        assert pos.verify(unique("PHG"), [line(code, "P-GS1")]).results[0].verdict == pb.OK
    _fresh_window()
    answers = [get(console.url + "/api/query?" + urllib.parse.urlencode({"code": form}))
               for form in (code, f"]d201{gtin}21{serial}")]
    assert [status for status, _ in answers] == [200, 200]
    assert answers[0][1] == answers[1][1]
    assert answers[0][1]["insured_sales"]["times"] == 1 and answers[0][1]["issued"]["batch"] == "L7"
    assert answers[0][1]["insured_sales"]["latest"]["region"] == "未登记地区"
