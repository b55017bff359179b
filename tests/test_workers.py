"""`tracecode serve --workers 2`: two server processes share the port (SO_REUSEPORT) under one
supervising parent, which aggregates their metrics, restarts a crashed worker, drains them on
SIGTERM, owns the embedded Redis, and whose death the workers notice on their own."""
from __future__ import annotations

import os
import signal

import grpc
import pytest

from tracecode.clients.pos import PosClient, line
from tracecode.server.app import make_store
from tracecode.server.config import Config
from tracecode.server.store import RedisProcess, free_port
from tracecode.v1 import verification_pb2 as pb

from factories import cn20
from ops_support import Samples, ServeProcess, scrape, wait_for

CONNECTIONS = 24  # all on one worker by chance: 2 * 2**-24


@pytest.fixture
def redis(tmp_path):
    r = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendonly=False).start()
    yield r
    r.stop()


def issue(url: str, n: int) -> list[str]:
    codes = [cn20() for _ in range(n)]
    store = make_store(Config(metrics_port=0), url)
    try:
        store.upsert_issuance([(c, "8123456", "", "B1", 0, 1, "test", "") for c in codes], replace=False)
    finally:
        store.close()
    return codes


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def connection_owners(port: int, pids: list[int]) -> dict[int, int]:
    """pid -> established TCP connections it holds on local `port` (the server side)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for row in fh:
                f = row.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                    inodes.add(f[9])
    owners = {}
    for pid in pids:
        n = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        owners[pid] = n
    return owners


def channel(target: str, n: int) -> grpc.Channel:
    # Own subchannel pool and a distinct argument: a new TCP connection per channel.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), ("test.conn", n)])


def settle(target: str, codes: list[str], n: int, ch: grpc.Channel | None = None):
    pos = PosClient(ch or channel(target, n), retries=0, deadline_s=10)
    resp = pos.verify(f"SITE-{n}", [line(c, "8123456") for c in codes])
    assert [r.verdict for r in resp.results] == [pb.OK] * len(codes), resp
    return pos


def test_two_workers_share_the_port_restart_and_drain(tmp_path, redis):
    metrics_port = free_port()
    served = ServeProcess(["--workers", "2", "--listen", f"127.0.0.1:{free_port()}", "--redis-url", redis.url,
                           "--metrics-port", str(metrics_port), "--grace-s", "5"], str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        assert served.metrics_port == metrics_port
        workers = children(served.proc.pid)
        assert len(workers) == 2, served.log()
        codes = issue(redis.url, CONNECTIONS + 3)

        # One settlement per connection; each connection is held (and so was served) by one process.
        channels = [channel(served.target, n) for n in range(CONNECTIONS)]
        for n, ch in enumerate(channels):
            settle(served.target, [codes[n]], n, ch)
        owners = connection_owners(served.port, [served.proc.pid, *workers])
        assert owners[served.proc.pid] == 0  # the parent never accepts
        assert all(owners[w] >= 1 for w in workers), owners
        assert sum(owners.values()) == CONNECTIONS, owners

        # The parent's /metrics adds up both workers.
        m = Samples(scrape(metrics_port))
        assert m.value("grpc_server_handled_total", grpc_method="VerifyDispense", grpc_code="OK") == CONNECTIONS
        assert m.value("tracecode_verifications_total", verdict="OK", channel="pos") == CONNECTIONS
        assert m.value("tracecode_workers") == 2
        assert m.value("tracecode_redis_up") == 1
        for ch in channels:
            ch.close()

        # A crashed worker is replaced; the other keeps serving meanwhile.
        os.kill(workers[0], signal.SIGKILL)
        # Connections queued on a listener as it dies are reset (unless net.ipv4.tcp_migrate_req):
        # a POS retries those; here the next connection is made once the process is gone.
        # (Reaped, not merely a zombie: a zombie leader's other threads may still hold the socket.)
        wait_for(lambda: not os.path.exists(f"/proc/{workers[0]}"), 10, "the killed worker to be reaped")
        settle(served.target, [codes[CONNECTIONS]], 100)
        replaced = wait_for(lambda: (lambda now: now if len(now) == 2 and workers[0] not in now else None)(
            children(served.proc.pid)), 20, "a replacement worker")
        assert workers[1] in replaced
        wait_for(lambda: Samples(scrape(metrics_port)).value("tracecode_workers") == 2, 20, "2 workers again")
        m = Samples(scrape(metrics_port))
        assert m.value("tracecode_worker_restarts_total") == 1
        # Counters of the dead worker are kept: totals never go backwards.
        assert m.value("grpc_server_handled_total", grpc_method="VerifyDispense", grpc_code="OK") >= CONNECTIONS

        # SIGTERM: both workers drain and exit, then the parent, with status 0.
        pos = settle(served.target, [codes[CONNECTIONS + 1]], 101)
        pos.close()
        served.signal(signal.SIGTERM)
        assert served.wait(30) == 0, served.log()
        assert not any(alive(p) for p in replaced)
        log = served.log()
        assert "signal SIGTERM: draining (grace 5.0 s): 2 workers" in log
        assert log.count("gRPC server stopped") == 2, log
        assert "Traceback" not in log, log
    finally:
        served.close()


def test_embedded_redis_started_first_shared_and_stopped_last(tmp_path):
    data = tmp_path / "data"
    served = ServeProcess(["--workers", "2", "--listen", "127.0.0.1:0", "--data-dir", str(data),
                           "--metrics-port", "0", "--grace-s", "2"], str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        kids = children(served.proc.pid)
        redis_pids = [p for p in kids if comm(p) == "redis-server"]
        workers = [p for p in kids if p not in redis_pids]
        assert len(redis_pids) == 1 and len(workers) == 2, (kids, served.log())
        codes = issue(f"unix://{data}/redis.sock", 2)
        for n, c in enumerate(codes):
            settle(served.target, [c], n).close()
        served.signal(signal.SIGTERM)
        assert served.wait(30) == 0, served.log()
        assert not any(alive(p) for p in kids)
        log = served.log()
        assert log.index("embedded redis-server stopped") > max(
            i for i in range(len(log)) if log.startswith("gRPC server stopped", i)), log
        assert any(f.startswith("appendonly") for f in os.listdir(data)), os.listdir(data)
    finally:
        served.close()


def test_workers_stop_when_the_parent_is_killed(tmp_path, redis):
    served = ServeProcess(["--workers", "2", "--listen", "127.0.0.1:0", "--redis-url", redis.url,
                           "--metrics-port", "0", "--grace-s", "2"], str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        workers = children(served.proc.pid)
        assert len(workers) == 2
        served.proc.kill()  # no signal to forward: the workers see their stdin pipe close
        served.proc.wait()
        wait_for(lambda: not any(alive(p) for p in workers), 20, "orphaned workers to exit")
    finally:
        served.close()
