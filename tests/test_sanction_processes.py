"""Sanctions and pseudonyms across real processes: `tracecode serve --workers 2` on a single Redis
and on the suite's real Redis Cluster (a sanction binds at every worker within 1 s, lifts and
ends likewise, a person is refused at two sites), and a scan of everything a deployment writes
(every Redis key and value, the server's log, /metrics, a bulk job's report files) for a raw
insured id: it appears nowhere, its pseudonym where documented."""
from __future__ import annotations

import csv
import itertools
import os
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest
import redis

from tracecode.server.store.layout import ENTRY_FIELDS, US
from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.clients.reverify import run_job
from tracecode.server.store import RedisProcess, free_port
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file
from tracecode.rules.packing import hex128_of

from factories import cn20, issuance, load
from ops_support import Samples, ServeProcess, scrape

P = "8123456"
BOUND_S = 1.0
CONNECTIONS = 12  # each its own TCP connection: spread over both workers (all on one: 2 * 2**-12)
_prefixes = itertools.count(1)


def channel(target: str, n: int) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), ("test.conn", n)])


def outcome(pos: PosClient, site: str, code: str, insured: str = "") -> str:
    try:
        return "OK" if pos.verify(site, [line(code, P)], insured_id=insured).results[0].verdict == 1 else "FLAGGED"
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return "REFUSED"
        raise


def every_connection(poses, site, pool, want, insured="", bound=BOUND_S) -> float:
    """Seconds until every connection (both workers) gets `want` for a fresh code; fails past
    the bound. Refused codes go back to the pool (nothing was marked)."""
    start = time.monotonic()
    pending = list(range(len(poses)))
    while pending:
        still = []
        for i in pending:
            code = pool.pop()
            got = outcome(poses[i], site, code, insured)
            if got == "REFUSED":
                pool.append(code)
            if got != want:
                still.append(i)
        pending = still
        elapsed = time.monotonic() - start
        assert not pending or elapsed < bound, f"{len(pending)} connections still not {want} after {elapsed:.2f} s"
    return time.monotonic() - start


@pytest.fixture
def served(redis_server, tmp_path, pseudonym_key):
    args = ["--workers", "2", "--listen", f"127.0.0.1:{free_port()}", "--redis-url", redis_server.url,
            "--metrics-port", str(free_port()), "--grace-s", "2", "--pseudonym-key-file", pseudonym_key,
            "--key-prefix", f"sp{os.getpid()}x{next(_prefixes)}"]
    if redis_server.cluster:
        args.append("--redis-cluster")
    proc = ServeProcess(args, str(tmp_path / "serve.log"))
    try:
        proc.wait_listening()
        yield proc
    finally:
        proc.close()


def test_sanctions_bind_at_every_worker_within_a_second(served):
    admin = AdminClient(served.target, timeout_s=5)
    chans = [channel(served.target, n) for n in range(CONNECTIONS)]
    poses = [PosClient(ch, deadline_s=5, retries=0) for ch in chans]
    try:
        pool = [cn20() for _ in range(400)]
        load(admin, *(issuance(c, P) for c in pool))
        site = "PH-W-1"
        every_connection(poses, site, pool, "OK")

        s = admin.set_sanction("SUSPEND_SERVICE", request_id="w-1", site_id=site, reason="r", reference="LEAD-W")
        took = every_connection(poses, site, pool, "REFUSED")
        admin.lift_sanction(s.sanction_id, reason="lifted")
        every_connection(poses, site, pool, "OK")

        # A suspension with an end stops binding on its own, at every worker.
        until = datetime.now(timezone.utc) + timedelta(seconds=2.5)
        admin.set_sanction("SUSPEND_SERVICE", request_id="w-2", site_id=site, valid_until=until, reason="r")
        every_connection(poses, site, pool, "REFUSED")
        time.sleep(max((until - datetime.now(timezone.utc)).total_seconds(), 0))
        every_connection(poses, site, pool, "OK")

        # A suspended person is refused at two sites, through every worker.
        admin.set_sanction("SUSPEND_CARD", request_id="w-3", insured_id="W-PERSON-1", reason="r")
        for other_site in ("PH-W-2", "PH-W-3"):
            every_connection(poses, other_site, pool, "REFUSED", insured="W-PERSON-1")
            every_connection(poses, other_site, pool, "OK", insured="W-PERSON-2")

        m = Samples(scrape(served.metrics_port))
        assert m.value("tracecode_sanction_refusals_total", reason="SITE_SANCTIONED") >= 2 * CONNECTIONS
        assert m.value("tracecode_sanction_refusals_total", reason="INSURED_SANCTIONED") >= 2 * CONNECTIONS
        assert 0 <= m.value("tracecode_sanction_view_age_seconds") < BOUND_S
        assert m.value("tracecode_workers") == 2
        assert took < BOUND_S
    finally:
        for p in poses:
            p.close()
        admin.close()


# ------------------------------------------------------------------ the raw id, nowhere

RAW = "11010819900306648x"  # as a POS might read it: lower-case check character
FORMS = {RAW, RAW.upper(), RAW.lower()}


def _redis_dump(url: str) -> list[str]:
    """Every key and every value of every key, as text."""
    r = redis.Redis.from_url(url, decode_responses=True)
    out = []
    try:
        for key in r.scan_iter(count=1000):
            out.append(key)
            kind = r.type(key)
            if kind == "string":
                out.append(r.get(key))
            elif kind == "hash":
                out += [f"{k}={v}" for k, v in r.hgetall(key).items()]
            elif kind == "list":
                out += r.lrange(key, 0, -1)
            elif kind == "set":
                out += list(r.smembers(key))
            elif kind == "zset":
                out += r.zrange(key, 0, -1)
            elif kind == "stream":
                out += [f"{i} {f}" for i, f in r.xrange(key)]
            else:
                out.append(f"?{kind}")
    finally:
        r.close()
    return out


def test_a_raw_insured_id_is_stored_logged_and_exported_nowhere(tmp_path):
    rp = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendonly=False).start()
    key_file = generate_key_file(str(tmp_path / "pseudonym.key"))
    pseudonym = Pseudonymizer.from_file(key_file).pseudonym(RAW)
    served = ServeProcess(["--workers", "2", "--listen", "127.0.0.1:0", "--redis-url", rp.url,
                           "--metrics-port", str(free_port()), "--grace-s", "2", "--pseudonym-key-file", key_file,
                           "--log-level", "DEBUG"], str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        admin = AdminClient(served.target, timeout_s=5)
        cs = [cn20() for _ in range(6)]
        load(admin, *(issuance(c, P) for c in cs))
        with PosClient(served.target, deadline_s=5, retries=0) as pos:
            assert outcome(pos, "PH-R-1", cs[0], RAW) == "OK"
            assert outcome(pos, "PH-R-2", cs[0], RAW) == "FLAGGED"  # a duplicate attempt, audited
            pos.check([line(cs[1], P)], site_id="PH-R-1", insured_id=RAW)
            admin.set_sanction("SUSPEND_CARD", request_id="raw-1", insured_id=RAW, reason="r")
            deadline = time.monotonic() + BOUND_S
            while outcome(pos, "PH-R-3", cs[2], RAW) != "REFUSED":
                assert time.monotonic() < deadline
            assert admin.list_sanctions(insured_id=RAW)[0].subject_id == pseudonym
            hist = pos.history(cs[0])
            assert hist.first_insured_id == pseudonym
        # A bulk job over an export that carries the raw id.
        export = tmp_path / "export.csv"
        with open(export, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units", "insured_id"])
            at = datetime.now(timezone.utc) - timedelta(days=3)
            w.writerow(["PH-R-9", "B-1", at.isoformat(), 1, cs[3], P, 0, RAW])
            w.writerow(["PH-R-8", "B-2", (at + timedelta(hours=1)).isoformat(), 1, cs[3], P, 0, RAW])
        report = tmp_path / "report"
        run_job(served.target, [str(export)], str(report), job_id="raw-job", progress=False)
        admin.close()

        stored = _redis_dump(rp.url)
        metrics_text = scrape(served.metrics_port)
        reports = {p.name: p.read_text(encoding="utf-8") for p in report.iterdir()}
        served.signal()
        served.wait(30)
        log = served.log()
        for form in FORMS:
            assert not [v for v in stored if form in v], form
            assert form not in log and form not in metrics_text
            assert not [name for name, text in reports.items() if form in text], form
        # The pseudonym is where docs/security.md says: dispense state, sanction entries, audit,
        # the bulk report's insured_id / first_insured_id columns.
        # A code's entry, "<packed code>=<fields joined by US>", holds it packed in its fp field
        # (rules/packing.py: the key id and the MAC's 128 bits in 22 characters).
        fp = ENTRY_FIELDS.index("fp")
        assert any("=" in v and [hex128_of(x) for x in v.split("=", 1)[1].split(US)[fp:fp + 1]] == [pseudonym]
                   for v in stored)
        assert any(k.endswith(f":x:ins:{pseudonym}") for k in stored)
        with open(report / "flagged.csv", encoding="utf-8") as fh:
            dup = next(r for r in csv.DictReader(fh) if r["verdict"] == "DUPLICATE")
        assert dup["insured_id"] == dup["first_insured_id"] == pseudonym
        assert "Traceback" not in log
    finally:
        served.close()
        rp.stop()


# ------------------------------------------------------------------ the key file, the CLI

def test_serve_generates_a_private_key_once_and_refuses_a_readable_one(tmp_path):
    data = tmp_path / "data"
    served = ServeProcess(["--listen", "127.0.0.1:0", "--data-dir", str(data), "--metrics-port", "0",
                           "--workers", "1", "--grace-s", "1"], str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        key = data / "pseudonym.key"
        assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
        assert "generated a new insured-pseudonym key" in served.log()
        first = key.read_text()
        served.signal()
        assert served.wait(30) == 0
    finally:
        served.close()
    again = ServeProcess(["--listen", "127.0.0.1:0", "--data-dir", str(data), "--metrics-port", "0",
                          "--workers", "1", "--grace-s", "1"], str(tmp_path / "serve2.log"))
    try:
        again.wait_listening()
        assert key.read_text() == first  # kept, not regenerated
        assert "generated a new" not in again.log()
    finally:
        again.close()
    readable = tmp_path / "open.key"
    generate_key_file(str(readable))
    os.chmod(readable, 0o644)
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0",
                          "--pseudonym-key-file", str(readable), "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "readable by group or others" in out.stderr


def test_sanction_cli_set_list_lift(target, capsys):
    from tracecode import cli
    assert cli.main(["sanction", "set", "SUSPEND_SERVICE", "--server", target, "--site", "PH-CLI",
                     "--request-id", "cli-1", "--reason", "倒卖", "--reference", "LEAD-CLI"]) == 0
    line_out = capsys.readouterr().out.strip()
    sanction_id = line_out.split()[0]
    assert sanction_id.startswith("sx-") and "SITE:PH-CLI" in line_out and "in_force=True" in line_out
    assert cli.main(["sanction", "list", "--server", target, "--site", "PH-CLI"]) == 0
    assert sanction_id in capsys.readouterr().out
    assert cli.main(["sanction", "lift", sanction_id, "--server", target, "--reason", "done"]) == 0
    assert "in_force=False" in capsys.readouterr().out
    assert cli.main(["sanction", "list", "--server", target, "--site", "PH-CLI"]) == 0
    assert capsys.readouterr().out.strip() == ""
    assert cli.main(["sanction", "set", "BLACKLIST", "--server", target, "--site", "PH-CLI",
                     "--request-id", "cli-2", "--reason", "r", "--valid-until", "2099-01-01T00:00:00+08:00"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
