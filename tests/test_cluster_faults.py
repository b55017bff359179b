"""Redis Cluster faults on real clusters of our own: a master killed under load (failover), and a
tracecode server killed between the two phases of an ALL_OR_NOTHING settlement across slots."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import grpc
import pytest
import redis

from tracecode.clients.admin import AdminClient
from tracecode.clients.files import Row
from tracecode.clients.pos import PosClient, line
from tracecode.server.app import Server, make_store
from tracecode.server.config import Config
from redis_cluster import RedisClusterProcesses
from tracecode.server.store.keys import slot_of
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, load

P = "8123456"


@pytest.fixture
def cluster():
    c = RedisClusterProcesses(masters=3, replicas=1).start()
    yield c
    c.stop()


@pytest.fixture
def serve(cluster):
    """Starts in-process servers on the cluster and stops them whatever the test's outcome: a
    server left running would keep pinging a stopped cluster and, through the process-wide
    tracecode_redis_up gauge, fail later tests that read it."""
    started = []

    def start(**overrides):
        cfg = Config(listen="127.0.0.1:0", metrics_port=0, redis_cluster=True, key_prefix="ft", threads=16,
                     grace_s=0.5, redis_timeout_s=1.0, **overrides)
        store = make_store(cfg, cluster.url)
        started.append((Server(cfg, store).start(), store))
        return started[-1]

    yield start
    for server, store in started:
        server.stop(0)
        store.close()


def test_master_killed_under_load_loses_no_acknowledged_dispense(cluster, serve):
    # A generous ack timeout: six redis-servers share two cores with the test here.
    server, store = serve(min_replicas_acked=1, replica_ack_timeout_ms=1500)
    target = f"127.0.0.1:{server.port}"
    codes = [cn20() for _ in range(6000)]
    admin = AdminClient(target)
    load(admin, *(Row("t", 0, {"code": c, "product_id": P}) for c in codes))
    victim = cluster.master_of(store.keys.issuance(codes[0]))
    on_victim = _slots_served_by(cluster, victim)

    acked: dict[str, str] = {}  # code -> settlement id answered OK
    statuses: list[grpc.StatusCode] = []
    lock = threading.Lock()
    todo = list(codes)

    # Long enough to see the whole story: failover, the dead node back as a replica, its full
    # resync (WAIT cannot succeed before it), and the shard acknowledging writes again.
    stop_at = time.monotonic() + 14

    def worker(n: int) -> None:
        with PosClient(target, deadline_s=3, retries=5, backoff_s=0.05, max_backoff_s=0.5) as pos:
            while time.monotonic() < stop_at:
                with lock:
                    if not todo:
                        return
                    code = todo.pop()
                sid = f"W{n}-{uuid.uuid4().hex[:10]}"
                try:
                    r = pos.verify(f"SITE-{n}", [line(code, P)], settlement_id=sid)
                except grpc.RpcError as exc:
                    with lock:
                        statuses.append(exc.code())
                    continue
                with lock:
                    if r.results[0].verdict == pb.OK:
                        acked[code] = sid

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    # The kill must hit acknowledged dispenses: wait until the victim's shard has acknowledged
    # some (codes are spread over the three shards by their hash tag), then take a snapshot.
    wait_until = time.monotonic() + 30
    while True:
        with lock:
            before_kill = {c: sid for c, sid in acked.items() if slot_of(c) in on_victim}
        if len(before_kill) >= 5:
            break
        assert time.monotonic() < wait_until, f"only {len(before_kill)} OKs on the victim's shard in 30 s"
        time.sleep(0.05)
    victim.kill()  # SIGKILL: its replica takes over
    # The promoted replica has no replica of its own, so with min_replicas_acked=1 its shard
    # answers UNAVAILABLE (nothing is acknowledged that could be lost) until the dead node comes
    # back and rejoins as the new master's replica, as an operator's restart would do.
    time.sleep(2.5)
    victim.start()
    for t in threads:
        t.join(60)
    cluster.wait_healthy()

    # Only retryable statuses were ever seen, and the service recovered without a restart.
    assert set(statuses) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}, statuses
    with PosClient(target, deadline_s=5, retries=30, backoff_s=0.1) as pos:
        fresh = cn20()
        load(admin, Row("t", 0, {"code": fresh, "product_id": P}))
        assert pos.verify("SITE-AFTER", [line(fresh, P)]).results[0].verdict == pb.OK
        # Every acknowledged dispense is still there, with its own settlement as first dispense.
        assert len(acked) >= 10, len(acked)  # some traffic got through (throughput on 2 shared cores varies 10x)
        # The dispenses the killed master had acknowledged (WAIT: its replica had them) are the
        # ones a failover could lose; they are all in `acked`, and all still there.
        assert len(before_kill) >= 5 and before_kill.items() <= acked.items()
        for code, sid in acked.items():
            h = pos.history(code)
            assert h.units_used == 1 and h.first_dispense.first_settlement_id == sid, code
    admin.close()


def _slots_served_by(cluster, node) -> frozenset[int]:
    """The slots `node` serves as master now (CLUSTER SLOTS, asked of the node itself)."""
    client = redis.Redis.from_url(node.url, decode_responses=True)
    try:
        return frozenset(slot for start, end, master, *_ in client.cluster("slots")
                         if int(master[1]) == node.port for slot in range(start, end + 1))
    finally:
        client.close()


def _two_slot_codes():
    a = cn20()
    return a, next(c for c in (cn20() for _ in range(100)) if slot_of(c) != slot_of(a))


def _dispensed(pos, code) -> int:
    return sum(1 for e in pos.history(code).events if e.type == pb.DISPENSED)


def _kill_mid_settlement(cluster, store, failpoint: str, a: str, b: str, sid: str, until) -> datetime:
    """Start a `tracecode serve` with a failpoint sleeping at `failpoint`, send SITE-A's
    ALL_OR_NOTHING settlement of packs a and b (two slots) to it, wait until `until(store)` says
    the settlement reached that point, and SIGKILL the server there. Returns the settlement's
    settled_at, for retries of the same body."""
    at = datetime.now(timezone.utc)
    env = dict(os.environ, TRACECODE_FAILPOINTS=f"{failpoint}=60")
    proc = subprocess.Popen([sys.executable, "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0",
                             "--redis-url", cluster.url, "--redis-cluster", "--key-prefix", "ft",
                             "--metrics-port", "0", "--reservation-s", "2", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        port = int(proc.stdout.readline().split()[-1])
        errors = []

        def settle():
            try:
                with PosClient(f"127.0.0.1:{port}", deadline_s=30, retries=0) as pos:
                    pos.verify("SITE-A", [line(a, P), line(b, P)], settlement_id=sid, settled_at=at,
                               all_or_nothing=True)
            except grpc.RpcError as exc:
                errors.append(exc.code())

        t = threading.Thread(target=settle)
        t.start()
        deadline = time.monotonic() + 20
        while not until(store):
            assert time.monotonic() < deadline, f"the settlement never reached {failpoint}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # dies between the phases
        proc.wait()
        t.join(10)
        assert errors == [grpc.StatusCode.UNAVAILABLE]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return at


def _prepared(sid, a, b):
    return lambda store: all(store.r.hget(store.keys.settlement_part("SITE-A", sid, c), "ps") == "P"
                             for c in (a, b))


def _decided(sid):
    return lambda store: store.r.hget(store.keys.settlement("SITE-A", sid), "dc") is not None


def test_server_killed_between_prepare_and_commit_leaves_nothing_after_expiry(cluster, serve):
    a, b = _two_slot_codes()
    helper, store = serve()
    target = f"127.0.0.1:{helper.port}"
    load(AdminClient(target), *(Row("t", 0, {"code": c, "product_id": P}) for c in (a, b)))
    _kill_mid_settlement(cluster, store, "after_prepare", a, b, "AON-1", _prepared("AON-1", a, b))

    with PosClient(target) as pos:
        # While reserved, the packs are held: another site is told they are taken.
        held = pos.verify("SITE-B", [line(a, P)])
        assert held.results[0].verdict == pb.DUPLICATE
        assert held.results[0].evidence.first_site_id == "SITE-A"
        assert pos.history(a).units_used == 0  # nothing was dispensed
        time.sleep(2.2)  # the reservation expires: nothing half-done remains
        after = pos.verify("SITE-C", [line(a, P), line(b, P)])
        assert [r.verdict for r in after.results] == [pb.OK, pb.OK]
        assert pos.history(b).first_dispense.first_site_id == "SITE-C"


def test_retry_after_expired_prepare_rejudges_and_never_dispenses_a_pack_twice(cluster, serve):
    """The double OK of issue 14: A's coordinator dies after preparing; its reservations expire;
    C takes pack a; A's retry on another server must not commit the stale preparation."""
    a, b = _two_slot_codes()
    other, store = serve()
    target = f"127.0.0.1:{other.port}"
    load(AdminClient(target), *(Row("t", 0, {"code": c, "product_id": P}) for c in (a, b)))
    at = _kill_mid_settlement(cluster, store, "after_prepare", a, b, "AON-2", _prepared("AON-2", a, b))
    time.sleep(2.2)  # the reservations expire
    with PosClient(target) as pos:
        assert pos.verify("SITE-C", [line(a, P)]).results[0].verdict == pb.OK
        retry = pos.verify("SITE-A", [line(a, P), line(b, P)], settlement_id="AON-2", settled_at=at,
                           all_or_nothing=True)
        # Judged afresh: a is now C's, so the all-or-nothing settlement records nothing.
        assert [r.verdict for r in retry.results] == [pb.DUPLICATE, pb.OK]
        assert retry.results[0].evidence.first_site_id == "SITE-C"
        assert not retry.recorded and not retry.replayed
        assert (pos.history(a).units_used, _dispensed(pos, a)) == (1, 1)
        assert (pos.history(b).units_used, _dispensed(pos, b)) == (0, 0)
        # The retry's answer is now the stored one, and b is free for anyone.
        again = pos.verify("SITE-A", [line(a, P), line(b, P)], settlement_id="AON-2", settled_at=at,
                           all_or_nothing=True)
        assert again.replayed and [r.verdict for r in again.results] == [pb.DUPLICATE, pb.OK]
        assert pos.verify("SITE-D", [line(b, P)]).results[0].verdict == pb.OK
        assert _dispensed(pos, b) == 1


def test_retry_after_expired_prepare_with_packs_untouched_commits_once(cluster, serve):
    a, b = _two_slot_codes()
    other, store = serve()
    target = f"127.0.0.1:{other.port}"
    load(AdminClient(target), *(Row("t", 0, {"code": c, "product_id": P}) for c in (a, b)))
    at = _kill_mid_settlement(cluster, store, "after_prepare", a, b, "AON-3", _prepared("AON-3", a, b))
    time.sleep(2.2)
    with PosClient(target) as pos:
        retry = pos.verify("SITE-A", [line(a, P), line(b, P)], settlement_id="AON-3", settled_at=at,
                           all_or_nothing=True)
        assert [r.verdict for r in retry.results] == [pb.OK, pb.OK]
        assert retry.recorded and not retry.replayed
        for c in (a, b):
            assert (pos.history(c).units_used, _dispensed(pos, c)) == (1, 1)
            assert pos.history(c).first_dispense.first_settlement_id == "AON-3"
        assert pos.verify("SITE-C", [line(a, P)]).results[0].verdict == pb.DUPLICATE


def test_decision_recorded_then_crash_retry_applies_it_without_taking_a_pack_twice(cluster, serve):
    """A coordinator that recorded 'commit' and died before committing: its retry applies the
    decision. If meanwhile (reservation expired) another site took pack a, the commit of a's part
    is refused (never two dispenses of a); the answer says which lines were recorded."""
    a, b = _two_slot_codes()
    other, store = serve()
    target = f"127.0.0.1:{other.port}"
    load(AdminClient(target), *(Row("t", 0, {"code": c, "product_id": P}) for c in (a, b)))
    at = _kill_mid_settlement(cluster, store, "after_decide", a, b, "AON-4", _decided("AON-4"))
    assert store.r.hget(store.keys.settlement("SITE-A", "AON-4"), "dc") == "K"
    time.sleep(2.2)
    with PosClient(target) as pos:
        assert pos.verify("SITE-C", [line(a, P)]).results[0].verdict == pb.OK
        retry = pos.verify("SITE-A", [line(a, P), line(b, P)], settlement_id="AON-4", settled_at=at,
                           all_or_nothing=True)
        assert retry.results[0].verdict == pb.DUPLICATE and retry.results[0].units_accepted == 0
        assert retry.results[1].verdict == pb.OK and retry.results[1].units_accepted == 1
        assert retry.recorded and not retry.replayed
        assert (pos.history(a).units_used, _dispensed(pos, a)) == (1, 1)
        assert pos.history(a).first_dispense.first_site_id == "SITE-C"
        assert (pos.history(b).units_used, _dispensed(pos, b)) == (1, 1)
        again = pos.verify("SITE-A", [line(a, P), line(b, P)], settlement_id="AON-4", settled_at=at,
                           all_or_nothing=True)
        assert again.replayed and [r.verdict for r in again.results] == [pb.DUPLICATE, pb.OK]
        assert _dispensed(pos, a) == 1 and _dispensed(pos, b) == 1
