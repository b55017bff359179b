"""The audit archive (tracecode archive, docs/archive.md) over real redis-servers, a real gRPC
server making the entries with POS calls, real archiver processes killed with SIGKILL, and the
Parquet files read back with pyarrow: every entry exactly once (by stream and ID), none missing,
none twice; nothing unarchived trimmed before the hard bound, and a bound trim counted and
logged; compaction; no raw insured id anywhere in the archive."""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from factories import cn20
from prometheus_client import REGISTRY

from tracecode.archive.archiver import Archiver, Settings
from tracecode.archive.dataset import SCHEMA, Archive
from tracecode.clients.pos import PosClient, line
from tracecode.server.app import Server, make_store
from tracecode.server.store import RedisProcess, free_port
from tracecode.server.store.archive import ArchiveStreams, share
from tracecode.server.store.audit import AuditReader

pytestmark = pytest.mark.backend_independent

P = "8123456"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The kill test's size: TRACECODE_ARCHIVE_ENTRIES=100000 for the acceptance run (about 4 minutes
# on 2 cores); the default keeps the suite's run short.
ENTRIES = int(os.environ.get("TRACECODE_ARCHIVE_ENTRIES", "6000"))


def raw_id(n: int) -> str:
    return f"5101{os.getpid() % 10000:04d}R{n:07d}"


class Witness:
    """A second consumer group reading every entry as it is written (and acknowledging it, so it
    holds nothing back from trimming): the set the archive must equal."""

    def __init__(self, store):
        self.reader = AuditReader.of(store, "witness")
        self.reader.ensure_group()
        self.seen: dict[tuple[int, str], dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        lost = False  # a read may have been delivered and its reply lost (Redis restarting): its
        while not self.stop.is_set():  # entries are then pending for "w", read again from there
            try:
                got = self.reader.pending("w", 1000) if lost else []
                lost = bool(got)
                got = got or self.reader.new("w", 1000, 100)
                for e in got:
                    self.seen[(e.bucket, e.entry_id)] = e.fields
                if got:
                    self.reader.ack([(e.bucket, e.entry_id) for e in got])
            except Exception:  # Redis restarting: read again once it is back, own pending first
                lost = True
                time.sleep(0.2)

    def drain(self, timeout=30):
        """Until the group has nothing left to read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.reader.status().lag == 0:
                    time.sleep(0.3)
                    return
            except Exception:
                pass
            time.sleep(0.2)


def pos_load(target: str, entries: int, errors: list) -> threading.Thread:
    """5-line settlements of codes never issued (each line an ATTEMPT, UNKNOWN) with an insured id,
    until about `entries` audit entries were made."""
    def run():
        n = 0
        with PosClient(target, deadline_s=5) as pos:
            while n < entries:
                lines = [line(cn20(), P) for _ in range(5)]
                sid = f"S{os.getpid()}-{n}"
                at = datetime.now(timezone.utc)  # a retry is the same request: same time, same body
                deadline = time.monotonic() + 60
                while True:  # Redis restarting: the same settlement again (idempotent)
                    try:
                        pos.verify("PH-A", lines, settlement_id=sid, settled_at=at, insured_id=raw_id(n))
                        break
                    except Exception as exc:
                        errors.append(exc)
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.25)
                n += 5
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def archiver_cmd(url: str, config, root: str, *, share_=(0, 1)) -> list[str]:
    return [sys.executable, "-m", "tracecode.cli", "archive", "--redis-url", url, "--key-prefix", config.key_prefix,
            "--pseudonym-key-file", config.pseudonym_key_file, "--archive", root, "--file-entries", "200",
            "--max-delay-s", "0.3", "--archive-metrics-port", "0", "--share", f"{share_[0]}/{share_[1]}",
            *(["--redis-cluster"] if config.redis_cluster else [])]


def start_archiver(cmd, failpoints: str = "", log=None) -> subprocess.Popen:
    env = dict(os.environ, TRACECODE_FAILPOINTS=failpoints)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)


def assert_exactly_once(root: str, witness: Witness, raw_ids: list[str]) -> pa.Table:
    table = Archive(root).read()
    keys = list(zip(table.column("stream").to_pylist(), table.column("entry_id").to_pylist()))
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} entries archived twice"
    missing = set(witness.seen) - set(keys)
    assert not missing, f"{len(missing)} entries missing from the archive, e.g. {sorted(missing)[:3]}"
    extra = set(keys) - set(witness.seen)
    assert not extra, f"{len(extra)} archived entries the witness never saw, e.g. {sorted(extra)[:3]}"
    # Every field as written: the pseudonym, the verdict, the billed product.
    for (b, eid), fields, p, v, g in zip(keys, (witness.seen[k] for k in keys), table.column("insured_pseudonym").to_pylist(),
                                         table.column("verdict").to_pylist(), table.column("product_id").to_pylist()):
        assert p == (fields.get("p") or None) and v == fields.get("x") and g == P, (b, eid, fields)
    assert_no_raw_ids(table, raw_ids)
    return table


def assert_no_raw_ids(table: pa.Table, raw_ids: list[str]) -> None:
    """No raw insured id in any column of any row (the pseudonyms are keyed hashes)."""
    raws = set(raw_ids)
    for name in table.column_names:
        if pa.types.is_string(table.schema.field(name).type):
            values = set(table.column(name).to_pylist())
            assert not values & raws, f"raw insured id in column {name}"
            assert not any(r in v for v in values if v for r in list(raws)[:50]), f"raw insured id inside column {name}"


def wait_archived(root: str, want: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = Archive(root).read().num_rows
        if n >= want:
            return n
        time.sleep(0.5)
    return n


def kill_loop(cmd, load: threading.Thread, rng: random.Random, log) -> int:
    """Start the archiver, SIGKILL it at a random moment; again, while the load runs. Failpoints
    stretch the moments before the rename and between the rename and the commit so that kills
    land there too. Kills made."""
    kills = 0
    while load.is_alive():
        proc = start_archiver(cmd, "archive_before_rename=0.02,archive_before_commit=0.05", log)
        time.sleep(rng.uniform(0.8, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    return kills


def finish(cmd, root: str, witness: Witness, log) -> None:
    witness.drain()
    proc = start_archiver(cmd, log=log)
    try:
        wait_archived(root, len(witness.seen))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.all_backends
def test_kill9_of_the_archiver_under_pos_load_archives_every_entry_exactly_once(redis_server, config, tmp_path):
    config = config.replace(audit_archive_bound=1_000_000)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    witness = Witness(store)
    witness.thread.start()
    root = str(tmp_path / "archive")
    log = open(tmp_path / "archiver.log", "ab")
    errors: list = []
    try:
        load = pos_load(f"127.0.0.1:{srv.port}", ENTRIES, errors)
        kills = kill_loop(archiver_cmd(redis_server.url, config, root), load, random.Random(25), log)
        assert kills >= 2
        finish(archiver_cmd(redis_server.url, config, root), root, witness, log)
        assert len(witness.seen) >= ENTRIES
        assert_exactly_once(root, witness, [raw_id(n) for n in range(0, ENTRIES, 5)])
        # Trimmed at the watermark: Redis holds next to nothing of what was archived.
        held = sum(int(store.r.xlen(s)) for s in store.keys.audit_streams())
        assert held < len(witness.seen) / 10, held
    finally:
        witness.stop.set()
        srv.stop(0)
        store.close()
        log.close()


def test_kill9_across_a_redis_restart(config, tmp_path):
    """The same, on a redis-server of its own (AOF, fsync always) restarted mid-run."""
    redis = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendfsync="always").start()
    config = config.replace(audit_archive_bound=1_000_000, redis_cluster=False)
    store = make_store(config, redis.url)
    srv = Server(config, store).start()
    witness = Witness(store)
    witness.thread.start()
    root = str(tmp_path / "archive")
    log = open(tmp_path / "archiver.log", "ab")
    errors: list = []
    cmd = archiver_cmd(redis.url, config, root)
    try:
        entries = max(ENTRIES // 2, 2000)
        load = pos_load(f"127.0.0.1:{srv.port}", entries, errors)
        proc = start_archiver(cmd, "archive_before_commit=0.05", log)
        time.sleep(2)
        redis.stop()  # the archiver's and the server's calls fail, and resume once it is back
        time.sleep(1)
        redis.start()
        time.sleep(2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_loop(cmd, load, random.Random(7), log)
        finish(cmd, root, witness, log)
        assert len(witness.seen) >= entries
        assert_exactly_once(root, witness, [raw_id(n) for n in range(0, entries, 5)])
    finally:
        witness.stop.set()
        srv.stop(0)
        store.close()
        redis.stop()
        log.close()


def test_two_archivers_share_the_streams_and_compaction_merges_a_partition(redis_server, config, tmp_path):
    config = config.replace(audit_archive_bound=1_000_000)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    witness = Witness(store)
    witness.thread.start()
    root = str(tmp_path / "archive")
    try:
        load = pos_load(f"127.0.0.1:{srv.port}", 1500, [])
        procs = [start_archiver(archiver_cmd(redis_server.url, config, root, share_=(i, 2))) for i in range(2)]
        load.join(120)
        witness.drain()
        assert wait_archived(root, len(witness.seen)) == len(witness.seen)
        for p in procs:
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
        archive = Archive(root)
        before = assert_exactly_once(root, witness, [raw_id(n) for n in range(0, 1500, 5)])
        day = archive.dates()[0]
        assert len(archive.files(day)) > 1
        out = subprocess.run(archiver_cmd(redis_server.url, config, root)[:4] + ["compact"]
                             + archiver_cmd(redis_server.url, config, root)[4:], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "files merged" in out.stdout
        files = archive.files(day)
        assert len(files) == 1 and files[0].base_name.startswith("c"), [f.base_name for f in files]
        after = archive.read()
        assert sorted(zip(after.column("stream").to_pylist(), after.column("entry_id").to_pylist())) == \
            sorted(zip(before.column("stream").to_pylist(), before.column("entry_id").to_pylist()))
        assert after.schema.equals(SCHEMA)
    finally:
        witness.stop.set()
        srv.stop(0)
        store.close()


def test_nothing_unarchived_is_trimmed_before_the_bound_and_a_bound_trim_is_counted_and_logged(
        redis_server, config, tmp_path, caplog):
    """The archiver stopped: one stream grows past audit_max untrimmed; past the bound the oldest
    unarchived entries go, counted in Redis and logged with their ID range by the archiver."""
    config = config.replace(audit_max=100, audit_archive_bound=1000)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    # Settlements whose records share one hash tag: their entries (each line an ATTEMPT, UNKNOWN,
    # in the settlement's stream) all go to one stream.
    stream = store.keys.audit_for(store.keys.settlement("PH-A", "B-0"))
    bucket = store.keys.audit_streams().index(stream)
    sids = (sid for sid in (f"B-{n}" for n in range(10**8))
            if store.keys.audit_for(store.keys.settlement("PH-A", sid)) == stream)
    streams = ArchiveStreams(store, "archive", share(0, 1), "archiver-0-of-1")
    streams.start()  # the archiver ran once, then stopped
    try:
        with PosClient(f"127.0.0.1:{srv.port}", deadline_s=5) as pos:
            for n in range(900):
                pos.verify("PH-A", [line(cn20(), P)], settlement_id=next(sids), insured_id=raw_id(n))
            assert store.r.xlen(stream) == 900  # far past audit_max (100): nothing trimmed
            assert not store.r.hget(stream + ":archive", "d")
            for n in range(900, 1200):
                pos.verify("PH-A", [line(cn20(), P)], settlement_id=next(sids), insured_id=raw_id(n))
        length = store.r.xlen(stream)
        dropped = int(store.r.hget(stream + ":archive", "d"))
        assert length <= 1000 and dropped > 0 and length + dropped == 1200
        # The archiver back: it logs the dropped range, exports the count, archives the rest.
        root = str(tmp_path / "archive")
        archiver = Archiver(streams, Archive(root), config.timezone, Settings(max_delay_s=0, status_every_s=0))
        with caplog.at_level("ERROR", logger="tracecode.archive"):
            archiver.start()
            archiver.run_once()
        assert REGISTRY.get_sample_value("tracecode_archive_guard_dropped_entries") >= dropped
        logged = [r.getMessage() for r in caplog.records if "hard bound" in r.getMessage()]
        # Each trim logged once with its range; the ranges follow one another and add up.
        found = [re.search(rf"dropped (\d+) unarchived entries of stream {bucket}, IDs (\S+) up to \(not including\) (\S+):", m)
                 for m in logged]
        assert all(found) and sum(int(m.group(1)) for m in found) == dropped, logged  # type: ignore[union-attr]
        assert all(a.group(3) == b.group(2) for a, b in zip(found, found[1:])), logged  # type: ignore[union-attr]
        archiver.flush(archiver.due(everything=True))
        table = Archive(root).read()
        assert table.num_rows == length
        first_kept = store.r.xrange(stream, "-", "+", count=1)
        assert not first_kept  # archived, then trimmed at the watermark
    finally:
        srv.stop(0)
        store.close()


def test_without_an_archive_streams_keep_their_maxlen(redis_server, config):
    config = config.replace(audit_max=100)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    stream = store.keys.audit_for(store.keys.settlement("PH-A", "B-0"))
    sids = (sid for sid in (f"B-{n}" for n in range(10**8))
            if store.keys.audit_for(store.keys.settlement("PH-A", sid)) == stream)
    try:
        with PosClient(f"127.0.0.1:{srv.port}", deadline_s=5) as pos:
            for _ in range(400):
                pos.verify("PH-A", [line(cn20(), P)], settlement_id=next(sids))
        assert store.r.xlen(stream) < 300  # MAXLEN ~ 100 (whole macro nodes of 100)
        assert not store.r.exists(stream + ":archive")
    finally:
        srv.stop(0)
        store.close()


def test_archive_refuses_a_missing_redis_url_and_names_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tracecode.cli", "archive", "--archive", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--redis-url" in out.stderr


def test_the_archive_on_s3_compatible_storage(redis_server, config, tmp_path, monkeypatch):
    """The same archive on an S3 endpoint (moto's server on loopback, through pyarrow's
    S3FileSystem from the URI): files uploaded under their names, read back, compacted, and read
    by the leads engine's archive reader."""
    import pyarrow.fs as pafs

    from tracecode.leads.archive import export_from_archive

    # The endpoint in its own process, as a real one is: not sharing this process's interpreter
    # lock with the gRPC server, the archiver and the load.
    port = free_port()
    s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert s3.poll() is None and time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir("evidence")
    uri = f"s3://evidence/tracecode?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    config = config.replace(audit_archive_bound=1_000_000)
    store = make_store(config, redis_server.url)
    srv = Server(config, store).start()
    try:
        streams = ArchiveStreams(store, "archive", share(0, 1), "archiver-0-of-1")
        streams.start()
        load = pos_load(f"127.0.0.1:{srv.port}", 400, [])
        load.join(60)
        expected = {(b, eid) for b, s in enumerate(store.keys.audit_streams()) for eid, _ in store.r.xrange(s)}
        assert len(expected) >= 400
        archive = Archive(uri)
        assert not archive.local
        archiver = Archiver(streams, archive, config.timezone, Settings(max_delay_s=0, status_every_s=0))
        archiver.start()
        deadline = time.monotonic() + 120
        while sum(s.unarchived for s in streams.state()) and time.monotonic() < deadline:
            # The production round: an endpoint may answer an upload with an error (S3 documents
            # a CompleteMultipartUpload's 200 with an error inside); the round restarts from the
            # intents and the same files are written again.
            archiver.round(pause_s=0.1)
        table = archive.read()
        keys = list(zip(table.column("stream").to_pylist(), table.column("entry_id").to_pylist()))
        assert len(keys) == len(set(keys)) and set(keys) == expected
        assert_no_raw_ids(table, [raw_id(n) for n in range(0, 400, 5)])
        day = archive.dates()[0]
        marks = streams.watermarks()
        merged, rows = archive.compact(day, committed=lambda b, last: b in marks)
        assert merged > 1 and rows == len(expected) and len(archive.live_files(day)) == 1
        assert sorted(zip(archive.read().column("stream").to_pylist(), archive.read().column("entry_id").to_pylist())) \
            == sorted(keys)
        lines = export_from_archive(uri, str(tmp_path / "export.parquet"))
        assert lines == len(expected)  # every entry here is an ATTEMPT line of a settlement
    finally:
        srv.stop(0)
        store.close()
        s3.terminate()
        s3.wait(30)


@pytest.mark.parametrize("bound,says", [(0, "no archive configured"), (5000, "archived (tracecode archive)")])
def test_serve_says_at_start_how_the_audit_streams_are_trimmed(redis_server, config, bound, says):
    proc = subprocess.Popen([sys.executable, "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0", "--redis-url",
                             redis_server.url, "--key-prefix", config.key_prefix, "--metrics-port", "0", "--workers", "1",
                             "--pseudonym-key-file", config.pseudonym_key_file, "--audit-archive-bound", str(bound)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line_ = proc.stderr.readline()
            seen.append(line_)
            if "audit streams:" in line_ or not line_:
                break
        assert any(says in s for s in seen), seen
    finally:
        proc.terminate()
        proc.wait(30)


class _FlakyStore(__import__("pyarrow.fs", fromlist=["FileSystemHandler"]).FileSystemHandler):
    """The local filesystem behind pyarrow's Python filesystem, reporting itself as object
    storage, whose first `fail` uploads of each name end in an error: what an endpoint's failed
    CompleteMultipartUpload does."""

    def __init__(self, fail: int):
        import pyarrow.fs as pafs
        self.fs, self.fail, self.tries = pafs.LocalFileSystem(), fail, {}

    def open_output_stream(self, path, metadata):
        n = self.tries[path] = self.tries.get(path, 0) + 1
        if n <= self.fail:
            raise OSError(f"When completing multiple part upload for key '{path}': AWS Error INTERNAL_FAILURE")
        return self.fs.open_output_stream(path)

    def get_type_name(self):
        return "flaky-s3"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not here")

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_append_stream(self, path, metadata):
        raise OSError("object storage has no append")


@pytest.mark.parametrize("fail,ok", [(3, True), (4, False)])
def test_an_upload_that_fails_is_made_again_whole_and_then_gives_up_naming_it(tmp_path, monkeypatch, fail, ok):
    """Every upload to object storage (a data file, the compaction's manifest) is tried afresh
    up to UPLOAD_ATTEMPTS times; after that the error reaches the caller (the archiver's round or
    the compaction), which restarts from what is committed."""
    import pyarrow.fs as pafs

    from tracecode.archive import dataset

    monkeypatch.setattr(dataset.time, "sleep", lambda s: None)
    archive = Archive(str(tmp_path))
    handler = _FlakyStore(fail)
    archive.fs, archive.local = pafs.PyFileSystem(handler), False
    table = SCHEMA.empty_table()
    path = f"{archive.partition('2026-12-07')}/s0001_1-0_2-0.parquet"
    if ok:
        archive.write(path, table)
        archive.write_text(f"{archive.partition('2026-12-07')}/_x.json", "{}")
        assert handler.tries[path] == 4 and archive.exists(path)
        assert archive.read("2026-12-07").num_rows == 0
    else:
        with pytest.raises(OSError, match="INTERNAL_FAILURE"):
            archive.write(path, table)
        assert handler.tries[path] == dataset.UPLOAD_ATTEMPTS and not archive.exists(path)


def test_every_field_an_entry_carries_has_its_column():
    """A NOTICE's figures and a receipt's supplier and delivery id are archived with the rest
    (the dataset module refuses to load if an audit field has no column)."""
    from tracecode.archive.dataset import split_by_date

    figures = '{"m":"STOCKPILING","v":1,"k":9}'
    entries = [("1765000000000-0", {"t": "NOTICE", "c": "81234560000000000001", "s": "PH-A", "i": "S1", "l": "0",
                                     "a": "1765000000000", "x": "STOCKPILING", "f": figures, "p": "k1." + "0" * 32}),
               ("1765000000001-0", {"t": "RECEIVED", "c": "81234560000000000002", "s": "PH-A", "i": "DN-1", "l": "0",
                                     "u": "1", "a": "1765000000001", "g": "8123456", "d": "国药控股"})]
    (rows,) = split_by_date(7, entries, lambda ms: "2025-12-06").values()
    got = rows.table().to_pylist()
    assert (got[0]["event"], got[0]["figures"], got[0]["supplier"]) == ("NOTICE", figures, None)
    assert (got[1]["event"], got[1]["supplier"], got[1]["settlement_id"], got[1]["figures"]) == \
        ("RECEIVED", "国药控股", "DN-1", None)
