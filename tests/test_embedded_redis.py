"""The embedded Redis of `tracecode serve` is supervised (issue 14), tested with real processes
and `kill -9`: restarted with backoff when it dies (health NOT_SERVING meanwhile, SERVING after,
nothing acknowledged lost), never orphaned when tracecode is killed, never run twice over one
data dir (an orphan found at start is stopped first), and private (0700 dir, 0600 files)."""
from __future__ import annotations

import os
import signal
import stat
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.store.embedded import PID_FILE, free_port
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, issuance, load
from ops_support import Samples, ServeProcess, scrape, wait_for

P = "8123456"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _serve(data_dir, log_path, *extra) -> ServeProcess:
    return ServeProcess(["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--workers", "1",
                         "--metrics-port", str(free_port()), *extra], str(log_path))


def _redis_pid(data_dir) -> int:
    with open(os.path.join(data_dir, PID_FILE)) as fh:
        return int(fh.read())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent, the test's killed tracecode, never reaped it).
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


@pytest.fixture
def served(tmp_path):
    started = []

    def start(data_dir=None, *extra) -> ServeProcess:
        proc = _serve(data_dir or tmp_path / "data", tmp_path / f"serve{len(started)}.log", *extra)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def _settle_one(target: str) -> str:
    code = cn20()
    admin = AdminClient(target)
    load(admin, issuance(code, P))
    admin.close()
    with PosClient(target, deadline_s=5) as pos:
        assert pos.verify("EMB-A", [line(code, P)]).results[0].verdict == pb.OK
    return code


def test_killed_redis_is_restarted_and_loses_no_acknowledged_dispense(served, tmp_path):
    srv = served(None, "--redis-restart-s", "2").wait_listening()
    code = _settle_one(srv.target)
    old = _redis_pid(tmp_path / "data")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _health(srv.target) == NOT_SERVING, 10, "NOT_SERVING while Redis is down")
    wait_for(lambda: _health(srv.target) == SERVING, 20, "SERVING after the restart")
    new = _redis_pid(tmp_path / "data")
    assert new != old and _alive(new) and not _alive(old)
    with PosClient(srv.target, deadline_s=5, retries=5) as pos:
        # The dispense acknowledged before the crash is in the AOF the new server loaded.
        assert pos.history(code).units_used == 1
        assert pos.verify("EMB-B", [line(code, P)]).results[0].verdict == pb.DUPLICATE
    log = srv.log()
    assert f"embedded redis-server (pid {old}) died (signal SIGKILL); restarting in 2.0 s" in log
    assert f"embedded redis-server restarted (pid {new}, restart 1)" in log
    assert Samples(scrape(srv.metrics_port)).value("tracecode_embedded_redis_restarts_total") == 1


def test_redis_dies_with_a_killed_tracecode_and_the_next_start_has_the_data(served, tmp_path):
    srv = served().wait_listening()
    code = _settle_one(srv.target)
    redis_pid = _redis_pid(tmp_path / "data")
    srv.signal(signal.SIGKILL)
    srv.wait(10)
    wait_for(lambda: not _alive(redis_pid), 10, "the orphaned redis-server to stop")
    again = served().wait_listening()
    with PosClient(again.target, deadline_s=5) as pos:
        assert pos.history(code).units_used == 1


def test_one_data_dir_serves_one_tracecode(served, tmp_path):
    first = served().wait_listening()
    redis_pid = _redis_pid(tmp_path / "data")
    second = served()
    assert second.wait(30) != 0
    assert f"data dir {tmp_path / 'data'} is in use by another tracecode (pid {first.proc.pid})" in second.log()
    # The first one and its Redis are untouched.
    assert _alive(redis_pid)
    wait_for(lambda: _health(first.target) == SERVING, 10, "the first serve still SERVING")


def test_an_orphan_found_at_start_is_stopped_before_redis_starts_again(served, tmp_path):
    srv = served().wait_listening()
    code = _settle_one(srv.target)
    orphan = _redis_pid(tmp_path / "data")
    # A stopped redis-server cannot act on the parent-death signal: it outlives the kill,
    # still holding the data dir's lock, as an orphan would where that signal is not available.
    os.kill(orphan, signal.SIGSTOP)
    srv.signal(signal.SIGKILL)
    srv.wait(10)
    time.sleep(0.5)
    assert _alive(orphan)
    again = served().wait_listening()
    assert not _alive(orphan)
    assert f"an orphaned redis-server (pid {orphan}) runs over" in again.log()
    with PosClient(again.target, deadline_s=5) as pos:
        assert pos.history(code).units_used == 1


def test_data_dir_is_private(served, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "old-notes.txt").write_text("left by an older start")
    os.chmod(data / "old-notes.txt", 0o644)
    srv = served(data).wait_listening()
    _settle_one(srv.target)
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    seen = 0
    for root, dirs, files in os.walk(data):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if not stat.S_ISSOCK(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o600, f
                seen += 1
    assert seen >= 4  # lock, pid file, log, AOF manifest and parts, the old file
