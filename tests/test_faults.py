"""Crash and outage safety on real processes: a redis-server of the test's own (never the shared
session one, never port 6379) stopped or SIGKILLed under load, and a `tracecode serve` process
SIGKILLed under load.

Each test runs pharmacies in threads, each sending settlements of distinct issued packs without
client retries (each call's own fate is what is measured), then reads the state back and checks:

- every acknowledged settlement is fully recorded: each of its packs has exactly one DISPENSED
  event, from that settlement (counted and asserted: zero acknowledged settlements lost);
- no settlement is half-recorded: a failed call left either nothing or everything (its answer can
  be lost after Redis applied it: then the retry must say `replayed`);
- a retry of every failed settlement with the same id and body completes it exactly once.

Standalone Redis only: a settlement is one Lua call there (the cluster's multi-slot faults are in
test_cluster_faults.py)."""
from __future__ import annotations

import itertools
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.app import Server, make_store
from tracecode.server.config import Config
from tracecode.server.store import RedisProcess, free_port
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, issuance, load
from ops_support import ServeProcess, wait_for

P = "8123456"
LINES = 3
WORKERS = 6
DEADLINE_S = 2.0


@dataclass
class Call:
    site: str
    sid: str
    at: datetime
    codes: list[str]
    status: grpc.StatusCode | None = None
    resp: object = None
    started: float = 0.0
    elapsed: float = 0.0


@dataclass
class Load:
    """Pharmacies settling distinct packs until told to stop (or the packs run out)."""
    target: str
    codes: list[str]
    pace_s: float = 0.01
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._chunks = iter([self.codes[i:i + LINES] for i in range(0, len(self.codes) - LINES + 1, LINES)])
        self._ids = itertools.count()
        self.threads = [threading.Thread(target=self._pharmacy, args=(w,), daemon=True) for w in range(WORKERS)]

    def _next(self, worker: int) -> Call | None:
        with self._lock:
            chunk = next(self._chunks, None)
            if chunk is None:
                return None
            call = Call(f"FAULT-{worker}", f"f-{next(self._ids)}", datetime.now(timezone.utc), chunk)
            self.calls.append(call)
            return call

    def _pharmacy(self, worker: int) -> None:
        with PosClient(self.target, deadline_s=DEADLINE_S, retries=0) as pos:
            while not self.stop.is_set():
                call = self._next(worker)
                if call is None:
                    return
                call.started = time.monotonic()
                try:
                    call.resp = pos.verify(call.site, [line(c, P) for c in call.codes], settlement_id=call.sid,
                                           settled_at=call.at)
                    call.status = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    call.status = exc.code()
                call.elapsed = time.monotonic() - call.started
                time.sleep(self.pace_s)

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def finish(self, timeout: float = 20) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a call never got an answer"

    def count(self, status=grpc.StatusCode.OK) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.status == status)

    def since(self, t: float) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.started >= t and c.status is not None]


def issue(target: str, n: int) -> list[str]:
    codes = [cn20() for _ in range(n)]
    admin = AdminClient(target, timeout_s=30)
    try:
        load(admin, *(issuance(c, P) for c in codes))
    finally:
        admin.close()
    return codes


def dispenses(store, codes: list[str]) -> dict[str, list[tuple[str, str]]]:
    """code -> [(site, settlement id)] of its DISPENSED events, read from Redis."""
    out = {}
    for c in codes:
        out[c] = [(e.site_id, e.settlement_id) for e in store.code_history(c).events if e.type == "DISPENSED"]
    return out


def check_no_loss_no_half(store, calls: list[Call]) -> tuple[list[Call], list[Call], list[Call]]:
    """(acknowledged, failed and applied, failed and untouched); asserts every acknowledged
    settlement is fully recorded and no failed one is half-recorded."""
    sent = [c for c in calls if c.status is not None]
    state = dispenses(store, [code for c in sent for code in c.codes])
    acked = [c for c in sent if c.status == grpc.StatusCode.OK]
    lost = [c.sid for c in acked
            if any(state[code] != [(c.site, c.sid)] for code in c.codes) or not c.resp.recorded]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged settlements not (fully) recorded: {lost[:5]}"
    applied, untouched, half = [], [], []
    for c in sent:
        if c.status == grpc.StatusCode.OK:
            continue
        mine = [state[code] == [(c.site, c.sid)] for code in c.codes]
        if all(mine):
            applied.append(c)
        elif not any(state[code] for code in c.codes):
            untouched.append(c)
        else:
            half.append(c.sid)
    assert not half, f"half-recorded settlements: {half}"
    print(f"\nFAULTSTATS acked={len(acked)} failed_applied={len(applied)} failed_untouched={len(untouched)}")
    return acked, applied, untouched


def retry_all(target: str, store, failed: list[Call], applied: list[Call]) -> None:
    """Retry every failed settlement with its id and body: exactly once in the end."""
    was_applied = {c.sid for c in applied}
    with PosClient(target, deadline_s=5, retries=3) as pos:
        for c in failed:
            resp = pos.verify(c.site, [line(code, P) for code in c.codes], settlement_id=c.sid, settled_at=c.at)
            assert resp.recorded and [r.verdict for r in resp.results] == [1] * LINES, c.sid
            # A settlement Redis had applied before the answer was lost is answered from its record.
            assert resp.replayed == (c.sid in was_applied), c.sid
    state = dispenses(store, [code for c in failed for code in c.codes])
    assert all(state[code] == [(c.site, c.sid)] for c in failed for code in c.codes)


def health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone on a free port, AOF fsynced on every write, restartable
    on the same port and data directory."""
    port = free_port()
    procs = []

    def start() -> RedisProcess:
        proc = RedisProcess(str(tmp_path / "redis"), port=port, appendfsync="always").start()
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.stop()


def in_process_server(url: str, prefix: str):
    cfg = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix=prefix, threads=8, grace_s=0.5,
                 redis_timeout_s=1.0)
    store = make_store(cfg, url)
    return Server(cfg, store).start(), store


def test_redis_stopped_mid_load_answers_unavailable_in_time_and_recovers_by_itself(own_redis):
    redis = own_redis()
    server, store = in_process_server(redis.url, "outage")
    target = f"127.0.0.1:{server.port}"
    try:
        work = Load(target, issue(target, 2400), pace_s=0.01).start()
        wait_for(lambda: work.count() >= 60, 15, "settlements before the outage")
        stopped_at = time.monotonic()
        redis.stop()  # SIGTERM: Redis finishes the command it is running and exits
        wait_for(lambda: health(target) == NOT_SERVING, 5, "health NOT_SERVING while Redis is down")
        time.sleep(0.8)
        during = [c for c in work.since(stopped_at + 0.3)]  # surely after Redis was gone
        restarted_at = time.monotonic()
        redis = own_redis()  # same port, same data directory: the AOF is read back
        # No restart of tracecode, no client help: calls succeed again and health turns SERVING.
        wait_for(lambda: any(c.status == grpc.StatusCode.OK for c in work.since(restarted_at)), 10,
                 "a settlement to succeed after Redis returned")
        wait_for(lambda: health(target) == SERVING, 5, "health SERVING after Redis returned")
        work.finish()

        assert len(during) >= 20, "too few calls hit the outage: the test measured nothing"
        assert {c.status for c in during} == {grpc.StatusCode.UNAVAILABLE}, {c.status for c in during}
        statuses = {c.status for c in work.calls if c.status}
        assert statuses <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, statuses
        # Every call got its answer within its deadline: none ran into DEADLINE_EXCEEDED.
        slowest = max(c.elapsed for c in work.calls if c.status)
        assert slowest < DEADLINE_S, slowest
        acked, applied, untouched = check_no_loss_no_half(store, work.calls)
        failed = [c for c in work.calls if c.status == grpc.StatusCode.UNAVAILABLE]
        assert len(acked) >= 60 and len(failed) == len(applied) + len(untouched)
        retry_all(target, store, failed, applied)
    finally:
        server.stop(0)
        store.close()


def test_redis_sigkill_under_load_with_appendfsync_always_loses_no_acknowledged_settlement(own_redis):
    redis = own_redis()
    server, store = in_process_server(redis.url, "sigkill")
    target = f"127.0.0.1:{server.port}"
    try:
        # No pacing: as many writes in flight as possible when the kill lands.
        work = Load(target, issue(target, 3600), pace_s=0.0).start()
        wait_for(lambda: work.count() >= 150, 15, "settlements before the kill")
        redis.kill()  # SIGKILL: no shutdown, no final fsync; only what the AOF already holds
        killed_at = time.monotonic()
        wait_for(lambda: any(c.status == grpc.StatusCode.UNAVAILABLE for c in work.since(killed_at)), 5,
                 "calls to fail while Redis is dead")
        acked_before = work.count()
        redis = own_redis()  # reloads the AOF
        work.finish()

        statuses = {c.status for c in work.calls if c.status}
        assert statuses <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, statuses
        acked, applied, untouched = check_no_loss_no_half(store, work.calls)
        # Zero acknowledged settlements lost, counted: every one answered before the kill is there.
        assert acked_before >= 150 and len(acked) >= acked_before
        failed = [c for c in work.calls if c.status == grpc.StatusCode.UNAVAILABLE]
        assert failed, "no call failed: the kill hit nothing"
        retry_all(target, store, failed, applied)
    finally:
        server.stop(0)
        store.close()


def test_tracecode_sigkill_under_load_leaves_nothing_half_recorded_and_retries_complete_once(tmp_path):
    redis = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendonly=False).start()
    # One process: the SIGKILL must hit the process that holds the in-flight settlements (with
    # --workers N a killed parent leaves its workers to drain them, tests/test_workers.py).
    args = ["--listen", "127.0.0.1:0", "--redis-url", redis.url, "--metrics-port", "0", "--key-prefix", "tckill",
            "--threads", "8", "--workers", "1"]
    first = ServeProcess(args, str(tmp_path / "first.log"))
    second = None
    store = make_store(Config(key_prefix="tckill"), redis.url)
    try:
        first.wait_listening()
        work = Load(first.target, issue(first.target, 3000), pace_s=0.0).start()
        wait_for(lambda: work.count() >= 150, 15, "settlements before the kill")
        first.signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        work.finish()
        statuses = {c.status for c in work.calls if c.status}
        assert statuses <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, statuses
        acked, applied, untouched = check_no_loss_no_half(store, work.calls)
        failed = [c for c in work.calls if c.status == grpc.StatusCode.UNAVAILABLE]
        assert len(acked) >= 150 and failed, (len(acked), len(failed))
        # A new tracecode over the same Redis finishes every failed settlement exactly once.
        second = ServeProcess(args, str(tmp_path / "second.log")).wait_listening()
        retry_all(second.target, store, failed, applied)
    finally:
        first.close()
        if second:
            second.close()
        store.close()
        redis.stop()


def test_redis_demoted_to_replica_answers_unavailable_not_unknown_and_recovers(tmp_path):
    """After a failover the node a kept connection talks to may have become a replica: it answers
    READONLY (and a replica cut from its master, MASTERDOWN). Both mean "not now, retry", i.e.
    UNAVAILABLE; nothing may reach the POS as UNKNOWN, and nothing is written."""
    primary = RedisProcess(str(tmp_path / "a"), port=free_port()).start()
    node = RedisProcess(str(tmp_path / "b"), port=free_port()).start()
    server, store = in_process_server(node.url, "demoted")
    target = f"127.0.0.1:{server.port}"
    try:
        codes = issue(target, 2)
        with PosClient(target, retries=0, deadline_s=5) as pos:
            assert pos.verify("SITE-D", [line(codes[0], P)], settlement_id="d-0").results[0].verdict == pb.OK
            store.r.replicaof("127.0.0.1", primary.port)  # what a failover does to an old master
            wait_for(lambda: store.r.info("replication")["master_link_status"] == "up", 10, "replica link")
            with pytest.raises(grpc.RpcError) as err:
                pos.verify("SITE-D", [line(codes[1], P)], settlement_id="d-1")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()

            store.r.config_set("replica-serve-stale-data", "no")
            primary.stop()  # the replica's master is gone: MASTERDOWN on every data command
            wait_for(lambda: store.r.info("replication")["master_link_status"] == "down", 10, "link down")
            with pytest.raises(grpc.RpcError) as err:
                pos.verify("SITE-D", [line(codes[1], P)], settlement_id="d-1")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()

            store.r.replicaof("NO", "ONE")  # promoted (empty: it took its old master's data set)
            store.r.config_set("replica-serve-stale-data", "yes")
            load(AdminClient(target), *(issuance(c, P) for c in codes))
            resp = pos.verify("SITE-D", [line(codes[1], P)], settlement_id="d-1")
            assert resp.recorded and resp.results[0].verdict == pb.OK
    finally:
        server.stop(0)
        store.close()
        node.stop()
        primary.stop()


def test_durable_write_not_acknowledged_when_wait_fails(tmp_path):
    """With --min-replicas-acked, a settlement is acknowledged only once WAIT confirms its
    replicas. A node that takes the write but cannot WAIT (a replica left writable by mistake:
    `replica-read-only no`) must not be acknowledged: UNAVAILABLE, retry with the same id."""
    primary = RedisProcess(str(tmp_path / "a"), port=free_port()).start()
    node = RedisProcess(str(tmp_path / "b"), port=free_port()).start()
    cfg = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix="waitfail", threads=4, grace_s=0.5,
                 redis_timeout_s=1.0, min_replicas_acked=1, replica_ack_timeout_ms=200)
    store = make_store(cfg, node.url)
    server = Server(cfg, store).start()
    target = f"127.0.0.1:{server.port}"
    try:
        codes = issue(target, 1)
        store.r.config_set("replica-read-only", "no")
        store.r.replicaof("127.0.0.1", primary.port)
        wait_for(lambda: store.r.info("replication")["master_link_status"] == "up", 10, "replica link")
        load_direct = make_store(cfg, node.url)  # issue on the writable replica itself
        load_direct.upsert_issuance([(codes[0], P, "", "B1", 0, 1, "M", "")], replace=True)
        load_direct.close()
        with PosClient(target, retries=0, deadline_s=5) as pos:
            with pytest.raises(grpc.RpcError) as err:
                pos.verify("SITE-W", [line(codes[0], P)], settlement_id="w-1")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    finally:
        server.stop(0)
        store.close()
        node.stop()
        primary.stop()
