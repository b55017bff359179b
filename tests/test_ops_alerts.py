"""The alert rules with the real Prometheus tools: promtool check/test, every alert fired and not
fired by a unit test, expressions only over series tracecode exports, and a real Prometheus
scraping a running `tracecode serve` and evaluating the rules against it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse

import pytest
import yaml

import tracecode.archive.archiver  # noqa: F401  the archiver's series (its own process; same names checked)
from tracecode import codec
from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server import metrics
from tracecode.server.store import RedisProcess, free_port

from factories import cn20, issuance, load
from ops_support import PROM_DIR, ServeProcess, http_get, scrape, tool, wait_for

# Alert rules and metric names do not depend on the backend: run on one.
pytestmark = pytest.mark.backend_independent

ALERTS = os.path.join(PROM_DIR, "alerts.yml")
ALERTS_TEST = os.path.join(PROM_DIR, "alerts_test.yml")
EXAMPLE_CONFIG = os.path.join(PROM_DIR, "prometheus.yml")
REQUIRED_ALERTS = {"TracecodeDuplicateRateSpike", "TracecodeDuplicateBurst", "TracecodeRedisUnavailable",
                   "TracecodeVerifyLatencyHigh", "TracecodeErrorRate", "TracecodeBulkJobStalled"}


def rules() -> list[dict]:
    with open(ALERTS) as fh:
        return [r for g in yaml.safe_load(fh)["groups"] for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=PROM_DIR)


def test_promtool_check_rules():
    out = run(tool("promtool"), "check", "rules", ALERTS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = run(tool("promtool"), "test", "rules", ALERTS_TEST)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_catch_a_wrong_expectation(tmp_path):
    # The unit tests do bite: with the burst threshold raised, its firing case fails.
    with open(ALERTS) as fh:
        text = fh.read()
    assert "> 20" in text
    (tmp_path / "alerts.yml").write_text(text.replace("> 20", "> 60"))
    with open(ALERTS_TEST) as fh:
        (tmp_path / "alerts_test.yml").write_text(fh.read())
    out = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "TracecodeDuplicateBurst" in out.stdout + out.stderr


def test_example_prometheus_config_is_valid():
    out = run(tool("promtool"), "check", "config", EXAMPLE_CONFIG)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_for_severity_action_and_a_firing_and_a_quiet_unit_test():
    names = {a["alert"] for a in alerts()}
    assert REQUIRED_ALERTS <= names
    for a in alerts():
        assert a.get("for"), a["alert"]
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]
        assert len(a["annotations"].get("action", "")) > 40, a["alert"]
        assert a["annotations"].get("summary") and a["annotations"].get("description"), a["alert"]
    with open(ALERTS_TEST) as fh:
        cases = [c for t in yaml.safe_load(fh)["tests"] for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fires == names, names - fires
    assert quiet == names, names - quiet


def test_alert_expressions_only_use_series_tracecode_exports(server):
    """A misspelt metric in an alert passes promtool (the unit tests would use the same spelling):
    check every name against a live /metrics."""
    http = metrics.MetricsHTTP(0)
    try:
        text = scrape(http.port)
    finally:
        http.close()
    exported = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_count", name + "_sum"}
    # (?<!:): not the middle of a recording rule's name (job:tracecode_duplicate_ratio:rate15m)
    used = {n for r in rules() for n in re.findall(r"(?<![:\w])((?:tracecode|grpc_server)_[a-z0-9_]+)\b", r["expr"])}
    # The console's exporter (`tracecode console metrics`) is a Django process of its own: its
    # series are checked against it by tests/test_pharmacy_alerts.py.
    used = {n for n in used if not n.startswith("tracecode_console_")}
    assert used and used <= exported, used - exported


# ---------------------------------------------------------------------- a real Prometheus

@pytest.fixture
def live(tmp_path):
    """Own Redis, `tracecode serve` on it, and a Prometheus scraping it every second with the
    alert rules loaded."""
    redis = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendonly=False).start()
    served = ServeProcess(["--listen", "127.0.0.1:0", "--redis-url", redis.url, "--metrics-port", str(free_port()),
                           "--key-prefix", "promtest", "--grace-s", "2"], str(tmp_path / "serve.log"))
    prom = None
    try:
        served.wait_listening()
        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 900ms}\n"
            f"rule_files: [{json.dumps(ALERTS)}]\n"
            "scrape_configs:\n"
            "  - job_name: tracecode\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{served.metrics_port}']}}]\n")
        prom_log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=prom_log, stderr=prom_log, cwd=str(tmp_path))
        base = f"http://127.0.0.1:{prom_port}"

        def ready():
            try:
                return http_get(f"{base}/-/ready", timeout=1).strip() != ""
            except OSError:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                return False
        wait_for(ready, 30, "Prometheus to be ready", interval=0.2)
        yield {"redis": redis, "served": served, "prometheus": base}
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        served.close()
        redis.stop()


def api(base: str, path: str, **params) -> dict:
    doc = json.loads(http_get(f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
    assert doc["status"] == "success", doc
    return doc["data"]


def test_real_prometheus_scrapes_tracecode_and_evaluates_the_alert_rules(live):
    base, served = live["prometheus"], live["served"]
    codes = [cn20() for _ in range(3)]
    admin = AdminClient(served.target)
    try:
        load(admin, *(issuance(c, "8123456") for c in codes))
    finally:
        admin.close()
    with PosClient(served.target, deadline_s=5) as pos:
        assert pos.verify("SITE-P", [line(c, "8123456") for c in codes]).recorded

    def scraped_ok():
        result = api(base, "query", query='tracecode_verifications_total{job="tracecode",verdict="OK",channel="pos"}')["result"]
        return result if result and float(result[0]["value"][1]) == 3 else None
    result = wait_for(scraped_ok, 20, "Prometheus to scrape 3 OK verifications", interval=0.25)
    assert result[0]["metric"]["instance"] == f"127.0.0.1:{served.metrics_port}"

    info = api(base, "query", query="tracecode_build_info")["result"]
    # The child inherits this process's environment, so it runs the same codec as this one.
    assert len(info) == 1 and info[0]["metric"]["codec"] == codec.IMPLEMENTATION
    handled = api(base, "query", query='sum(grpc_server_handled_total{grpc_method="VerifyDispense",grpc_code="OK"})')
    assert float(handled["result"][0]["value"][1]) == 1

    # Every rule has been evaluated against the real series without an error ("unknown" before
    # its first evaluation, "err" when the query fails).
    def evaluated():
        rs = [r for g in api(base, "rules")["groups"] for r in g["rules"]]
        return rs if rs and all(r["health"] == "ok" for r in rs) else None
    rs = wait_for(evaluated, 20, "every rule evaluated with health ok", interval=0.25)
    assert {r["name"] for r in rs if r["type"] == "alerting"} == {a["alert"] for a in alerts()}
    assert not api(base, "alerts")["alerts"]  # a healthy server raises nothing

    # Redis goes away: the real tracecode_redis_up series drives TracecodeRedisUnavailable.
    live["redis"].stop()

    def pending():
        return [a for a in api(base, "alerts")["alerts"] if a["labels"]["alertname"] == "TracecodeRedisUnavailable"]
    alert = wait_for(pending, 20, "TracecodeRedisUnavailable to become pending", interval=0.25)[0]
    # /api/v1/alerts lists active alerts only (pending or firing); seen a moment after it turned
    # active, it must still be pending: the rule holds it for 30 s before it fires.
    assert alert["state"] == "pending"
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["job"] == "tracecode"
