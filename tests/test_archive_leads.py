"""`tracecode leads --archive`: the leads from the audit archive of a live run equal the leads
from the same history given as a settlement export, on DuckDB and on Spark.

The live run: a generated history (leads/synth.py: resales, swaps, stockpiling, split packs)
settled settlement by settlement through a real server's POS API over a real redis-server, in
the order of settled_at, and archived by a real `tracecode archive` process. The export: the
rows of the settlements the server accepted (what happened), raw insured ids and raw scans, no
amounts (the archive holds none)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

from tracecode.archive.dataset import Archive
from tracecode.clients.admin import AdminClient
from tracecode.clients.files import ISSUANCE_FIELDS, read_rows
from tracecode.clients.pos import PosClient, line
from tracecode.leads import synth
from tracecode.server.app import Server, make_store
from tracecode.server.store.audit import AuditReader

pytestmark = pytest.mark.backend_independent
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leads(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracecode.cli", "leads", *args, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def outputs(out: str) -> dict[str, bytes]:
    names = ("leads.csv", "evidence.csv")
    res = {}
    for n in names:
        with open(os.path.join(out, n), "rb") as fh:
            res[n] = fh.read()
    return res


def test_leads_from_the_archive_equal_leads_from_the_same_history_as_an_export(redis_server, config, tmp_path):
    config = config.replace(audit_archive_bound=1_000_000, clock_skew_s=10**9)
    h = synth.history(1200, seed=25)
    iss = synth.write_csv(str(tmp_path / "issuance.csv"), h.issuance, synth.ISSUANCE_COLUMNS)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    target = f"127.0.0.1:{srv.port}"
    root = str(tmp_path / "archive")
    archiver = subprocess.Popen(
        [sys.executable, "-m", "tracecode.cli", "archive", "--redis-url", redis_server.url, "--key-prefix",
         config.key_prefix, "--pseudonym-key-file", config.pseudonym_key_file, "--archive", root,
         "--max-delay-s", "0.2", "--archive-metrics-port", "0", *(["--redis-cluster"] if config.redis_cluster else [])],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = AdminClient(target)
        try:
            admin.upsert(read_rows(iss, ISSUANCE_FIELDS), source=iss)
        finally:
            admin.close()
        settlements: dict[tuple[str, str], list[dict]] = {}
        for rows in h.files:
            for row in rows:
                settlements.setdefault((row["site_id"], row["settlement_id"]), []).append(row)
        order = sorted(settlements.values(), key=lambda rs: datetime.fromisoformat(rs[0]["settled_at"]))
        accepted: list[dict] = []
        with PosClient(target, deadline_s=10) as pos:
            for rows in order:
                try:
                    pos.verify(rows[0]["site_id"], [line(r["code"], r["product_id"], int(r["units"] or 0)) for r in rows],
                               settlement_id=rows[0]["settlement_id"],
                               settled_at=datetime.fromisoformat(rows[0]["settled_at"]),
                               insured_id=rows[0]["insured_id"])
                except Exception as exc:  # refused as a whole (a bad line): not part of what happened
                    assert "INVALID_ARGUMENT" in str(exc) or "invalid" in str(exc).lower(), exc
                    continue
                accepted.extend({**r, "amount": ""} for r in rows)
        assert len(accepted) > 1000
        # Every entry archived: the group has nothing left, nothing pending.
        reader = AuditReader.of(store, "archive")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = reader.status()
            if s.lag == 0 and s.pending == 0:
                break
            time.sleep(0.3)
        assert s.lag == 0 and s.pending == 0, s
    finally:
        archiver.send_signal(signal.SIGTERM)
        archiver.wait(30)
        srv.stop(0)
        store.close()

    export = synth.write_csv(str(tmp_path / "export.csv"), accepted, synth.SETTLEMENT_COLUMNS)
    days = Archive(root).dates()
    assert days and all(d.startswith("2024-03") for d in days), days
    results = {}
    for engine in ("duckdb", "spark"):
        a, b = str(tmp_path / f"from-export-{engine}"), str(tmp_path / f"from-archive-{engine}")
        out = leads(export, "--issuance", iss, "--out", a, "--pseudonym-key", config.pseudonym_key_file,
                    "--engine", engine, "--spark-master", "local[1]")
        assert out.returncode == 0, out.stderr
        out = leads("--archive", root, "--from", days[0], "--until", days[-1], "--issuance", iss, "--out", b,
                    "--engine", engine, "--spark-master", "local[1]")
        assert out.returncode == 0, out.stderr
        results[engine] = (outputs(a), outputs(b))
    for engine, (from_export, from_archive) in results.items():
        assert from_export["leads.csv"].count(b"\n") > 3, from_export["leads.csv"][:500]
        for name in from_export:
            assert from_export[name] == from_archive[name], (engine, name)
    assert results["duckdb"] == results["spark"]


def test_leads_archive_options_are_checked(tmp_path):
    out = leads("--archive", str(tmp_path / "nowhere"), "--issuance", "x.csv", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "nowhere" in out.stderr and "no such directory" in out.stderr
    os.makedirs(tmp_path / "empty")
    out = leads("--archive", str(tmp_path / "empty"), "--from", "2024-01-01", "--issuance", "x.csv", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "no files for settlement dates 2024-01-01..end" in out.stderr
    out = leads("--archive", str(tmp_path / "empty"), "--from", "1.1.2024", "--issuance", "x.csv", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "--from '1.1.2024': expected YYYY-MM-DD" in out.stderr
    out = leads("export.csv", "--from", "2024-01-01", "--issuance", "x.csv", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "need --archive" in out.stderr


def test_the_archives_receipts_feed_unreceived_and_keep_the_supplier(redis_server, config, tmp_path):
    """The receiving check's RECEIVED entries reach the archive whole (the supplier and the
    delivery id kept), and `leads --archive` reads them as the UNRECEIVED model's receipts: a
    site that uses the check and sells packs it never received is a lead, the packs it did
    receive are not counted, and a site that never uses the check is not judged."""
    import csv

    from tracecode.archive.archiver import Archiver, Settings
    from tracecode.clients.receiving import ReceivingClient
    from tracecode.server.store.archive import ArchiveStreams, share

    from factories import cn20, issuance, load

    P = "8123456"
    config = config.replace(audit_archive_bound=1_000_000)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    target = f"127.0.0.1:{srv.port}"
    received, unreceived, elsewhere = [cn20(P) for _ in range(3)], [cn20(P) for _ in range(4)], [cn20(P) for _ in range(4)]
    root = str(tmp_path / "archive")
    try:
        admin = AdminClient(target)
        try:
            load(admin, *(issuance(c, P) for c in received + unreceived + elsewhere))
        finally:
            admin.close()
        with ReceivingClient(target, timeout_s=10) as rc:
            resp = rc.receive("PH-A", "DN-7", [(c, P) for c in received], supplier="国药控股")
            assert len(resp.results) == 3
        with PosClient(target, deadline_s=10) as pos:
            for n, c in enumerate(received + unreceived):
                pos.verify("PH-A", [line(c, P)], settlement_id=f"A{n}")
            for n, c in enumerate(elsewhere):  # PH-B never uses the receiving check
                pos.verify("PH-B", [line(c, P)], settlement_id=f"B{n}")
        streams = ArchiveStreams(store, "archive", share(0, 1), "archiver-0-of-1")
        streams.start()
        archive = Archive(root)
        archiver = Archiver(streams, archive, config.timezone, Settings(max_delay_s=0, status_every_s=0))
        deadline = time.monotonic() + 60
        while True:
            archiver.round(pause_s=0.05)
            if not sum(s.unarchived for s in streams.state()) or time.monotonic() > deadline:
                break
    finally:
        srv.stop(0)
        store.close()
    table = Archive(root).read()
    got = [r for r in table.to_pylist() if r["event"] == "RECEIVED"]
    assert sorted(r["code"] for r in got) == sorted(received)
    assert {(r["site"], r["settlement_id"], r["supplier"]) for r in got} == {("PH-A", "DN-7", "国药控股")}
    iss = tmp_path / "issuance.csv"
    iss.write_text("code,product_id\n" + "".join(f"{c},{P}\n" for c in received + unreceived + elsewhere))
    out = str(tmp_path / "leads")
    res = leads("--archive", root, "--issuance", str(iss), "--out", out)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(out, "leads.csv"), encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["model"] == "UNRECEIVED"]
    assert [(r["subject_id"], r["packs"]) for r in rows] == [("PH-A", "4")]
