"""LIVE leads from the server's audit feed, with real processes: a real redis-server, a real
tracecode gRPC server (whose AuditFeed service the console reads: the console reads no Redis),
DUPLICATEs made by real POS calls, the console's consumer as its own process (killed mid-run and
restarted), the ledger on a real PostgreSQL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from console_support import unique
from factories import cn20, issuance, load

from tracecode.clients.admin import AdminClient
from tracecode.clients.audit import AuditFeedClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.store import free_port
from tracecode.v1 import verification_pb2 as pb


def _resell(target: str, n_packs: int, buyers: list[str], first: str) -> int:
    """n packs sold at `first`, each then sold again at a buyer: one DUPLICATE per resale."""
    admin = AdminClient(target)
    codes = [cn20() for _ in range(n_packs)]
    load(admin, *(issuance(c, "P1") for c in codes))
    admin.close()
    dups = 0
    with PosClient(target, deadline_s=5) as pos:
        for c in codes:
            assert pb.Verdict.Name(pos.verify(first, [line(c, "P1")]).results[0].verdict) == "OK"
        for i, c in enumerate(codes):
            r = pos.verify(buyers[i % len(buyers)], [line(c, "P1")])
            assert pb.Verdict.Name(r.results[0].verdict) == "DUPLICATE"
            dups += 1
    return dups


def _metrics(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:  # not listening yet
        return {}
    out = {}
    for ln in text.splitlines():
        if ln.startswith("tracecode_console_audit") and " " in ln:
            name, value = ln.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Consumer:
    def __init__(self, console_env, service, *extra, failpoints: str = ""):
        self.metrics_port = free_port()
        self.log = tempfile.TemporaryFile()  # not a pipe: a chatty consumer must never block on it
        env = {**os.environ, **console_env.env}
        if failpoints:
            env["TRACECODE_FAILPOINTS"] = failpoints
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracecode.console.cli", "consume", "--server", service.target,
             "--consumer", "console-a", "--metrics-port", str(self.metrics_port), *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _live(sites):
    from tracecode.console.ledger.models import Evidence, Lead
    return (Evidence.objects.filter(lead__source="LIVE", site_id__in=sites).count(),
            Lead.objects.filter(source="LIVE", subject_id__in=sites))


def _snapshot(sites):
    from tracecode.console.ledger.models import Entry, Evidence, Hit, Lead
    leads = Lead.objects.filter(subject_id__in=sites)
    return (sorted(leads.values_list("id", "ref", "lines", "packs", "status")),
            sorted(Evidence.objects.filter(lead__in=leads).values_list("id", "key", "lead_id")),
            sorted(Hit.objects.filter(lead__in=leads).values_list("id", "key")),
            sorted(Entry.objects.filter(lead__in=leads).values_list("id", "kind", "after")))


def test_consumer_killed_mid_run_loses_nothing_and_duplicates_nothing(console_env, service):
    buyers = [unique("BUY") for _ in range(3)]
    first = unique("FIRST")
    dups = _resell(service.target, 24, buyers, first)
    # Mid-run: at most 8 entries a second, and a pause after committing before acknowledging,
    # the window where a crash leaves committed entries unacknowledged.
    c = Consumer(console_env, service, "--max-rate", "8", failpoints="console_before_ack=30")
    try:
        _wait(lambda: _live(buyers)[0] >= 4 or c.proc.poll() is not None, 60, "the first evidence")
        assert c.proc.poll() is None, c.output()
    finally:
        c.kill()
    seen, _ = _live(buyers)
    assert 0 < seen < dups  # killed mid-run, with work done
    with AuditFeedClient(service.target) as feed:
        _, pending = feed.status("ledger-console")
    assert pending > 0  # delivered, committed (some), never acknowledged

    more = _resell(service.target, 6, buyers, first)  # while no consumer runs
    c = Consumer(console_env, service)
    try:
        total = dups + more
        _wait(lambda: _live(buyers)[0] == total, 60, f"{total} evidence lines")
        m = _wait(lambda: (lambda m: m if m.get("tracecode_console_audit_lag") == 0 and
                           m.get("tracecode_console_audit_pending") == 0 else None)(_metrics(c.metrics_port)),
                  30, "lag and pending at 0")
        assert m["tracecode_console_audit_duplicates_total"] >= total - seen
        count, leads = _live(buyers)
        assert count == total
        # One open lead per buying site; its evidence grouped per (site, day) hits.
        assert sorted(leads.values_list("subject_id", flat=True)) == sorted(buyers)
        for lead in leads:
            assert lead.lines == lead.evidence.count() == total // len(buyers)
            assert {h.external.rsplit(":", 1)[0] for h in lead.hits.all()} == {f"LIVE:{lead.subject_id}"}

        # A new DUPLICATE shows up within seconds while the consumer runs.
        t0 = time.monotonic()
        _resell(service.target, 1, buyers[:1], first)
        _wait(lambda: _live(buyers)[0] == total + 1, 10, "the new DUPLICATE in the ledger")
        print(f"new DUPLICATE in the ledger after {time.monotonic() - t0:.2f} s")
    finally:
        c.stop()

    # Replaying the audit stream from the start leaves the ledger unchanged.
    before = _snapshot(buyers)
    c = Consumer(console_env, service, "--from-start")
    try:
        _wait(lambda: (lambda m: m.get("tracecode_console_audit_lag") == 0 and m.get("tracecode_console_audit_pending") == 0
                       and m.get("tracecode_console_audit_entries_total", 0) >= total + 1)(_metrics(c.metrics_port)),
              60, "the replay to finish")
    finally:
        c.stop()
    assert _snapshot(buyers) == before


def test_lag_metric_counts_what_the_group_has_not_read(console_env, service):
    from tracecode.console.ledger.stream import AuditConsumer, ConsumerConfig
    consumer = AuditConsumer(ConsumerConfig(server=service.target, consumer="t"))
    buyers = [unique("BUY")]
    _resell(service.target, 5, buyers, unique("FIRST"))
    # One more resale by a card holder: the audit entry carries the server's pseudonym (`p`).
    raw = unique("5101") + "x"
    admin = AdminClient(service.target)
    code = cn20()
    load(admin, issuance(code, "P1"))
    admin.close()
    with PosClient(service.target, deadline_s=5) as pos:
        pos.verify(unique("FIRST"), [line(code, "P1")])
        pos.verify(buyers[0], [line(code, "P1")], insured_id=raw)
    lag, pending = consumer.update_lag()
    assert (lag, pending) == (12, 0)  # 6 DISPENSED + 6 DUPLICATE attempts, the group not even made yet
    assert consumer.run_once(block_ms=100) == 12
    assert consumer.update_lag() == (0, 0)
    assert _live(buyers)[0] == 6
    from tracecode.console.ledger.intake import pseudonymizer
    from tracecode.console.ledger.models import Evidence
    ev = Evidence.objects.get(site_id=buyers[0], canonical_code=code)
    assert ev.insured_pseudonym == pseudonymizer().pseudonym(raw)  # the console's and the server's agree
    assert raw not in console_env.pg.dump() and raw.upper() not in console_env.pg.dump()
    consumer.close()


def test_consumer_on_a_redis_cluster(console_env):
    """The same consumer over a tracecode server on a real 3-master Redis Cluster (the audit
    streams spread over its slots; the server reads them one XREADGROUP per stream)."""
    from tracecode.console.ledger.stream import AuditConsumer, ConsumerConfig
    from tracecode.server.app import Server, make_store
    from tracecode.server.config import Config
    from redis_cluster import RedisClusterProcesses

    cluster = RedisClusterProcesses(masters=3, replicas=0).start()
    prefix = unique("k")
    cfg = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix=prefix, threads=4, grace_s=0.5,
                 redis_cluster=True, pseudonym_key_file=console_env.key_file)
    store = make_store(cfg, cluster.url)
    srv = Server(cfg, store).start()
    try:
        target = f"127.0.0.1:{srv.port}"
        consumer = AuditConsumer(ConsumerConfig(server=target, consumer="t"))
        buyers = [unique("BUY"), unique("BUY")]
        _resell(target, 8, buyers, unique("FIRST"))
        assert consumer.update_lag() == (16, 0)
        seen = 0
        deadline = time.monotonic() + 30
        while seen < 16 and time.monotonic() < deadline:
            seen += consumer.run_once(block_ms=100)
        assert seen == 16 and consumer.update_lag() == (0, 0)
        count, leads = _live(buyers)
        assert count == 8 and leads.count() == 2
        before = _snapshot(buyers)
        consumer.replay_from_start()
        # Heartbeats sent while the test was busy may come first: count events, not rounds.
        replayed, deadline = 0, time.monotonic() + 30
        while replayed < 16 and time.monotonic() < deadline:
            replayed += consumer.run_once(block_ms=100)
        assert replayed == 16
        assert _snapshot(buyers) == before
        assert consumer.update_lag() == (0, 0)
        consumer.close()
    finally:
        srv.stop(0)
        store.close()
        cluster.stop()


def test_the_console_reads_no_redis():
    """The console knows the feed, not the streams: no redis import, no key format, no BUCKETS
    anywhere in console/ (import-linter's "Only the store speaks Redis" holds it too)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "console")
    offenders = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                offenders += [f"{f}: {w}" for w in ("import redis", "BUCKETS", ":audit", "xreadgroup")
                              if w in text]
    assert not offenders, offenders


def test_a_redis_import_in_the_console_breaks_the_contract(tmp_path):
    """The console is a source module of import-linter's "Only the store speaks Redis": a planted
    `import redis` in the consumer fails it."""
    from test_architecture import _assemble, _lint
    scratch = _assemble(str(tmp_path))
    with open(os.path.join(scratch, "tracecode", "console", "ledger", "stream.py"), "a") as fh:
        fh.write("\nimport redis  # deliberate violation\n")
    out = _lint(scratch)
    assert out.returncode != 0
    assert "Only the store speaks Redis" in out.stdout and "BROKEN" in out.stdout and "tracecode.console" in out.stdout, \
        out.stdout
