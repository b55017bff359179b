"""A pharmacy's own alerts (console/ledger/alerts.py, pharmacy.py), with real parts: a tracecode
server with bearer-token authentication on a real redis-server, DUPLICATE and PRODUCT_MISMATCH
attempts made by real POS calls, the console's audit consumer turning them into the ledger's
alerts, the console as its own process serving the pharmacy API (which has the server verify each
token through Identity.WhoAmI), and the inspector's lead page in Chromium.

- a pharmacy's token lists its own counter's alerts and none of another's; another pharmacy's
  alert cannot be answered (404) and is unchanged;
- an answer (cause from the table, a note) is idempotent on retry, cannot be changed (409), and
  reaches the lead: the inspector sees it on the lead page in the browser and accepts it, which
  concludes the lead 查证不属实 with the technical cause;
- bad, missing and admin tokens are refused with Chinese messages;
- unanswered alerts are counted by age (48 hours, 5 days) in the console's metrics, and the alert
  rule over that series is checked by promtool in tests/test_ops_alerts.py.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from datetime import timedelta

import grpc
import pytest
from console_support import ConsoleProcess, artifacts_dir, http, make_user, unique
from factories import cn20, issuance, load
from test_console_browser import _login, chromium

from tracecode.clients.admin import AdminClient
from tracecode.clients.identity import IdentityClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.api import auth
from tracecode.v1 import verification_pb2 as pb

SECRET = b"pharmacy-test-secret-0123456789abcdef-0123"


@pytest.fixture
def token_service(console_env, console_redis, tmp_path):
    """A tracecode server with auth = token, the console pointed at it with an admin token."""
    from django.conf import settings

    from tracecode.console.ledger import gateway, packs, pharmacy
    from tracecode.server.app import Server, make_store
    from tracecode.server.config import Config

    secret = tmp_path / "token.secret"
    secret.write_bytes(SECRET)
    admin_token = tmp_path / "console.token"
    admin_token.write_text(auth.issue_token(SECRET, "admin", "console", 3600))
    cfg = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix=unique("ph"), threads=8, grace_s=0.5,
                 pseudonym_key_file=console_env.key_file, auth="token", auth_token_secret_file=str(secret))
    store = make_store(cfg, console_redis.url)
    srv = Server(cfg, store, **auth.from_config(cfg).server_kwargs()).start()
    target = f"127.0.0.1:{srv.port}"
    saved = settings.TRACECODE_SERVER, settings.TRACECODE_TOKEN_FILE
    settings.TRACECODE_SERVER, settings.TRACECODE_TOKEN_FILE = target, str(admin_token)
    for mod in (gateway, packs, pharmacy):
        mod.reset_client()
    try:
        yield target, str(admin_token)
    finally:
        settings.TRACECODE_SERVER, settings.TRACECODE_TOKEN_FILE = saved
        for mod in (gateway, packs, pharmacy):
            mod.reset_client()
        srv.stop(0)
        store.close()


def bearer(role: str, name: str) -> tuple:
    return (("authorization", f"Bearer {auth.issue_token(SECRET, role, name, 600)}"),)


def api(base: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def consume_until(target: str, token_file: str, pred, timeout: float = 30.0):
    """The console's audit consumer (stream.py, in this process on the test database) until pred()."""
    from tracecode.console.ledger.stream import AuditConsumer, ConsumerConfig
    c = AuditConsumer(ConsumerConfig(target, consumer="pharmacy-test", token_file=token_file, block_ms=200))
    try:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, "the alerts did not reach the ledger"
            c.run_once()
    finally:
        c.close()


def unanswered() -> dict[str, float]:
    from tracecode.console.ledger.alerts import Collector
    return {s.labels["older_than"]: s.value for fam in Collector().collect() for s in fam.samples
            if s.name == "tracecode_console_pharmacy_alerts_unanswered"}


def test_whoami_is_the_servers_verdict_on_a_token(token_service):
    target, _ = token_service
    with IdentityClient(target, timeout_s=5) as ident:
        who = ident.whoami(metadata=bearer("site", "PH-W"))
        assert (who.authenticated, who.role, who.name) == (True, "site", "PH-W")
        with pytest.raises(grpc.RpcError) as err:
            ident.whoami(metadata=(("authorization", "Bearer " + auth.issue_token(b"x" * 40, "site", "PH-W", 60)),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_pack_refused_at_the_receiving_check_is_the_receiving_pharmacys_alert(console_env, token_service):
    """A resold pack offered as stock (入库核验: DUPLICATE) is an alert of the pharmacy that checked
    it, kept once, named by the delivery, and shown in Chinese; a pack accepted as stock is none."""
    from tracecode.clients.receiving import ReceivingClient
    from tracecode.console.ledger import alerts
    from tracecode.console.ledger.models import Alert

    target, token_file = token_service
    seller, receiver = unique("PHS"), unique("PHR")
    sold, fresh = cn20(), cn20()
    with AdminClient(target, metadata=bearer("admin", "ops"), timeout_s=5) as admin:
        load(admin, issuance(sold, "P1"), issuance(fresh, "P1"))
    with PosClient(target, deadline_s=5, retries=0, metadata=bearer("site", seller)) as pos:
        assert pos.verify(seller, [line(sold, "P1")]).results[0].verdict == pb.OK
    with ReceivingClient(target, timeout_s=5, metadata=bearer("site", receiver)) as rc:
        resp = rc.receive(receiver, "DN-9", [(fresh, "P1"), (sold, "P1")], supplier="某医药公司")
    assert [r.verdict for r in resp.results] == [pb.OK, pb.DUPLICATE]
    consume_until(target, token_file, lambda: Alert.objects.filter(site_id=receiver).exists())
    time.sleep(0.5)
    consume_until(target, token_file, lambda: True)  # one more round: nothing else arrives
    (a,) = Alert.objects.filter(site_id=receiver)
    assert (a.kind, a.verdict, a.canonical_code, a.settlement_id, a.lead) == ("RECEIVE", "DUPLICATE", sold, "DN-9", None)
    assert alerts.message(a).startswith("入库核验未通过") and a.kind_label == "入库预警"
    assert not Alert.objects.filter(site_id=seller).exists()


def test_pharmacy_sees_and_answers_only_its_own_alerts_and_the_inspector_accepts(console_env, token_service, tmp_path):
    from django.utils import timezone

    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.intake import import_sites
    from tracecode.console.ledger.models import Alert, Entry, Lead

    target, token_file = token_service
    region = unique("R")
    a, b, first = unique("PHA"), unique("PHB"), unique("PHF")
    (tmp_path / "sites.csv").write_text(f"site_id,site_kind,region,name\n{a},PHARMACY,{region},甲\n"
                                        f"{b},PHARMACY,{region},乙\n", encoding="utf-8")
    import_sites(str(tmp_path / "sites.csv"))
    x, y, z = cn20(), cn20(), cn20()
    with AdminClient(target, metadata=bearer("admin", "ops"), timeout_s=5) as admin:
        load(admin, issuance(x, "P1"), issuance(y, "P1"), issuance(z, "P1"))
    pos = {s: PosClient(target, deadline_s=5, retries=0, metadata=bearer("site", s)) for s in (a, b, first)}
    try:
        assert pos[first].verify(first, [line(x, "P1")]).results[0].verdict == pb.OK
        assert pos[first].verify(first, [line(y, "P1")]).results[0].verdict == pb.OK
        # b resells x; a resells y and bills z as another product (串换).
        assert pos[b].verify(b, [line(x, "P1")], settlement_id="SB1").results[0].verdict == pb.DUPLICATE
        assert pos[a].verify(a, [line(y, "P1")], settlement_id="SA1").results[0].verdict == pb.DUPLICATE
        assert pos[a].verify(a, [line(z, "P2")], settlement_id="SA2").results[0].verdict == pb.PRODUCT_MISMATCH
    finally:
        for p in pos.values():
            p.close()
    consume_until(target, token_file, lambda: Alert.objects.filter(site_id__in=(a, b)).count() == 3)
    # The ledger kept them once each, a DUPLICATE's alert on that site's LIVE lead.
    b_alert = Alert.objects.get(site_id=b)
    assert b_alert.lead is not None and b_alert.lead.subject_id == b and b_alert.lead.source == "LIVE"
    assert Alert.objects.get(site_id=a, verdict="PRODUCT_MISMATCH").lead is None

    console = ConsoleProcess(console_env, target)
    console.env["TRACECODE_CONSOLE_TOKEN_FILE"] = token_file
    console.start()
    try:
        tok_a = auth.issue_token(SECRET, "site", a, 600)
        tok_b = auth.issue_token(SECRET, "site", b, 600)
        status, mine_b = api(console.url, "/api/pharmacy/alerts", tok_b)
        assert status == 200 and mine_b["site_id"] == b
        assert [(x_["canonical_code"], x_["verdict"], x_["state"]) for x_ in mine_b["alerts"]] == [(x, "DUPLICATE", "OPEN")]
        assert mine_b["alerts"][0]["message"].startswith("重复结算")
        assert {c["code"] for c in mine_b["causes"]} == {"DOUBLE_SCAN", "RETURN_RESOLD", "DATA_ERROR", "OTHER"}
        status, mine_a = api(console.url, "/api/pharmacy/alerts", tok_a)
        assert status == 200
        assert sorted((x_["canonical_code"], x_["verdict"]) for x_ in mine_a["alerts"]) == sorted(
            [(y, "DUPLICATE"), (z, "PRODUCT_MISMATCH")])
        # Isolation: nothing of b in a's list, and a cannot answer b's alert.
        assert b_alert.canonical_code not in json.dumps(mine_a) and b not in json.dumps(mine_a)
        b_id = mine_b["alerts"][0]["id"]
        status, body = api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_a, {"cause": "DOUBLE_SCAN", "note": "x"})
        assert (status, body["error"]) == (404, "没有该预警（或不属于本机构）")
        assert not Alert.objects.get(pk=b_alert.pk).answered_at

        # Refusals, each with its reason.
        assert api(console.url, "/api/pharmacy/alerts", None)[0] == 401
        status, body = api(console.url, "/api/pharmacy/alerts", auth.issue_token(b"y" * 40, "site", b, 600))
        assert status == 401 and body["error"].startswith("令牌无效或已过期")
        status, body = api(console.url, "/api/pharmacy/alerts", auth.issue_token(SECRET, "site", b, -120))
        assert status == 401 and "expired" in body["error"]
        status, body = api(console.url, "/api/pharmacy/alerts", auth.issue_token(SECRET, "admin", "ops", 600))
        assert status == 403 and body["error"].startswith("该令牌不是药店身份")
        status, body = api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_b, {"cause": "FRAUD", "note": ""})
        assert status == 400 and body["field"] == "cause"
        status, body = api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_b, {"cause": "OTHER", "note": ""})
        assert (status, body["field"]) == (400, "note")
        status, body = api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_b,
                           {"cause": "DOUBLE_SCAN", "note": "bad\u202etext"})
        assert status == 400 and "U+202E" in body["error"]

        # b answers; the same answer again is a retry; another is refused.
        note = "顾客退货后未在系统登记退药，店员误将该盒再次销售"
        answer = {"cause": "RETURN_RESOLD", "note": note}
        status, body = api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_b, answer)
        assert status == 200 and body["alert"]["state"] == "ANSWERED"
        assert body["alert"]["answer"]["cause_label"] == "退货误售"
        assert api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_b, answer)[0] == 200
        status, body = api(console.url, f"/api/pharmacy/alerts/{b_id}/answer", tok_b, {"cause": "DOUBLE_SCAN", "note": ""})
        assert status == 409 and "不能修改" in body["error"]
        entries = Entry.objects.filter(lead=b_alert.lead, kind="ANSWER")
        assert [(e.actor, e.after) for e in entries] == [(f"site:{b}", "RETURN_RESOLD")]
        assert api(console.url, "/api/pharmacy/alerts?state=open", tok_b)[1]["alerts"] == []

        # The inspector sees the answer on the lead page and accepts it.
        sup, ins = make_user("supervisor"), make_user("inspector")
        lead = Lead.objects.get(pk=b_alert.lead_id)
        workflow.assign(lead, ins, sup, "核查药店答复")
        shots = artifacts_dir()
        with chromium() as browser:
            page = browser.new_page(locale="zh-CN", viewport={"width": 1400, "height": 1000})
            _login(page, console, ins)
            page.goto(f"{console.url}/leads/{lead.ref}/")
            row = page.locator("#pharmacy-answers tr.alert-row")
            assert row.count() == 1
            assert row.locator(".answer-cause").inner_text().startswith("退货误售")
            assert row.locator(".answer-note").inner_text() == note
            assert f"site:{b}" in page.locator("#history").inner_text()
            page.screenshot(path=os.path.join(shots, "pharmacy-answer-lead.png"), full_page=True)
            row.locator("button[type=submit]").click()
            page.wait_for_selector("text=已采纳药店答复")
            assert page.locator("#lead-status").inner_text() == "查证不属实"
            assert "技术原因：退货误售" in page.locator("#summary").inner_text()
            assert page.locator("#pharmacy-answers .accepted").count() == 1
        lead.refresh_from_db()
        assert (lead.status, lead.cause) == ("UNFOUNDED", "TECH_RETURN_RESOLD")
        status, body = api(console.url, "/api/pharmacy/alerts", tok_b)
        assert body["alerts"][0]["state"] == "ACCEPTED"

        # Unanswered alerts by age: a's two alerts, one aged past 48 hours, then past 5 days.
        base = unanswered()
        one = Alert.objects.filter(site_id=a).order_by("id").first()
        Alert.objects.filter(pk=one.pk).update(raised_at=timezone.now() - timedelta(hours=49))
        aged = unanswered()
        assert (aged["0h"] - base["0h"], aged["48h"] - base["48h"], aged["5d"] - base["5d"]) == (0, 1, 0)
        Alert.objects.filter(pk=one.pk).update(raised_at=timezone.now() - timedelta(days=6))
        older = unanswered()
        assert (older["48h"] - base["48h"], older["5d"] - base["5d"]) == (1, 1)
        status, _ = api(console.url, f"/api/pharmacy/alerts/{one.public_id}/answer", tok_a,
                        {"cause": "DOUBLE_SCAN", "note": ""})
        assert status == 200
        assert unanswered() == base | {"0h": base["0h"] - 1}
    finally:
        console.stop()

    # Supervisors (and auditors) follow every pharmacy's alerts, those without a lead included;
    # an inspector sees only their leads, so not this page.
    sup_page = http(sup).get(f"/alerts/?state=answered&site={a}")
    assert sup_page.status_code == 200
    html = sup_page.content.decode()
    assert one.canonical_code in html and "柜台重复扫码" in html
    other = Alert.objects.get(site_id=a, answered_at__isnull=True)
    assert other.canonical_code not in html
    assert other.canonical_code in http(sup).get(f"/alerts/?site={a}").content.decode()
    assert http(ins).get("/alerts/").status_code == 403


def test_answer_cause_other_cannot_conclude_a_lead(console_env):
    """其他 explains nothing the ledger can conclude on: the inspector must find the cause."""
    from django.utils import timezone

    from tracecode.console.ledger import alerts, workflow
    from tracecode.console.ledger.intake import LiveDuplicate, add_live
    from tracecode.console.ledger.models import Alert, Evidence

    site = unique("PHO")
    dup = LiveDuplicate(site, "S1", 0, cn20(), timezone.now())
    add_live([dup])
    lead = Evidence.objects.get(key=dup.key).lead
    a = Alert.objects.create(key=unique("k"), site_id=site, kind="ATTEMPT", verdict="DUPLICATE",
                             canonical_code=dup.canonical_code, raised_at=timezone.now(), lead=lead)
    alerts.answer(site, str(a.public_id), "OTHER", "需进一步说明")
    sup, ins = make_user("supervisor"), make_user("inspector")
    workflow.assign(lead, ins, sup, "")
    with pytest.raises(workflow.RuleError, match="其他"):
        alerts.accept(a.pk, ins, "")
    with pytest.raises(alerts.NotFound):
        alerts.answer(unique("PHX"), str(a.public_id), "DOUBLE_SCAN", "")
    lead.refresh_from_db()
    assert lead.status == "IN_PROGRESS"


def test_console_series_in_the_alert_rules_are_exported_by_the_console(console_env):
    """The rules' tracecode_console_* series against a scrape of `tracecode console metrics` (the
    server's series are checked by tests/test_ops_alerts.py)."""
    import re

    import yaml

    from tracecode.console.ledger.management.commands.metrics import serve
    server, thread = serve(0, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        thread.join(5)
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    with open(os.path.join(os.path.dirname(__file__), "..", "deploy", "prometheus", "alerts.yml")) as fh:
        exprs = [r["expr"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"]]
    used = {n for e in exprs for n in re.findall(r"\b(tracecode_console_[a-z0-9_]+)\b", e)}
    assert used == {"tracecode_console_pharmacy_alerts_unanswered"}
    assert used <= exported, used - exported
    for older in ("0h", "48h", "5d"):
        assert f'tracecode_console_pharmacy_alerts_unanswered{{older_than="{older}"}}' in text
    assert 'tracecode_console_public_queries_total{outcome="limited"}' in text


def test_without_authentication_on_the_server_the_pharmacy_api_is_closed(console_env, service):
    """auth = none has no identities to keep pharmacies apart by: every call is a 503 saying so."""
    from tracecode.console.ledger import pharmacy
    pharmacy.reset_client()
    try:
        resp = http().get("/api/pharmacy/alerts", HTTP_AUTHORIZATION="Bearer " + auth.issue_token(SECRET, "site", "PH-N", 60))
        assert resp.status_code == 503
        assert resp.json()["error"] == "结算服务未启用身份认证（auth = none），药店接口不可用"
        assert http().get("/api/pharmacy/alerts").status_code == 401
    finally:
        pharmacy.reset_client()
