"""The AuditFeed service over a real redis-server and gRPC server, with real POS calls making the
events: who may read it (admins only, when authentication is on), what crosses it (pseudonyms,
never a raw insured id), bad input named by field, and the reading order its readers rely on
(one batch in flight, own pending first after a reconnect, claims from a vanished consumer,
replay from the start). The console's consumer over it: tests/test_console_stream.py."""
from __future__ import annotations

import os
import queue
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from factories import cn20, issuance, load
from tracecode.clients.admin import AdminClient
from tracecode.clients.audit import AuditFeedClient
from tracecode.clients.pos import PosClient, line
from tracecode.rules.pseudonym import Pseudonymizer
from tracecode.server.api import auth
from tracecode.server.app import Server
from tracecode.v1 import audit_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

pytestmark = pytest.mark.backend_independent  # the cluster path: test_console_stream's cluster test

P = "8123456"
SECRET = b"0123456789abcdef0123456789abcdef-audit-feed-secret"


def _resell(target: str, n: int, *, metadata=(), site_metadata=lambda site: (), first_buyer: str = "",
            second_buyer: str = "") -> list[str]:
    """n packs sold at PH-A, then again at PH-B: 2n events (n DISPENSED, n DUPLICATE attempts)."""
    codes = [cn20() for _ in range(n)]
    admin = AdminClient(target, metadata=metadata)
    try:
        load(admin, *(issuance(c, P) for c in codes))
    finally:
        admin.close()
    with PosClient(target, metadata=site_metadata("PH-A"), deadline_s=5) as a, \
            PosClient(target, metadata=site_metadata("PH-B"), deadline_s=5) as b:
        for c in codes:
            assert pb.Verdict.Name(a.verify("PH-A", [line(c, P)], insured_id=first_buyer).results[0].verdict) == "OK"
            r = b.verify("PH-B", [line(c, P)], insured_id=second_buyer)
            assert pb.Verdict.Name(r.results[0].verdict) == "DUPLICATE"
    return codes


def _drain(feed: AuditFeedClient, group: str, consumer: str, want: int, **kw) -> list[apb.AuditEvent]:
    """Read and acknowledge until `want` events came; the events in order."""
    out: list[apb.AuditEvent] = []
    watch = feed.watch(group, consumer, block_ms=100, **kw)
    deadline = time.monotonic() + 20
    try:
        for batch in watch:
            out.extend(batch.events)
            if batch.events:
                feed.ack(group, [e.cursor for e in batch.events])
            if len(out) >= want or time.monotonic() > deadline:
                break
    finally:
        watch.cancel()
    return out


def violations(err: grpc.RpcError) -> dict[str, str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    status = rpc_status.from_call(err)
    detail = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(detail)
    return {v.field: v.description for v in detail.field_violations}


def test_events_are_typed_and_carry_pseudonyms_never_raw_ids(target, config):
    raw_first, raw_second = f"5101{os.getpid()}x1", f"5102{os.getpid()}y2"
    (code,) = _resell(target, 1, first_buyer=raw_first, second_buyer=raw_second)
    with AuditFeedClient(target) as feed:
        assert feed.status("typed") == (2, 0)  # the group not made yet: everything is lag
        events = _drain(feed, "typed", "t", 2)
        assert feed.status("typed") == (0, 0)
    # Ordered within a stream, not across streams: a sale and the attempt may sit in two.
    sold, dup = sorted(events, key=lambda e: e.type != apb.AUDIT_DISPENSED)
    assert (apb.AuditEventType.Name(sold.type), apb.AuditEventType.Name(dup.type)) == ("AUDIT_DISPENSED", "AUDIT_ATTEMPT")
    assert dup.verdict == pb.DUPLICATE and dup.detail == "DUPLICATE"
    assert (dup.canonical_code, dup.site_id, dup.line_index) == (code, "PH-B", 0)
    assert sold.site_id == "PH-A" and sold.units > 0 and sold.at.seconds > 0
    key = Pseudonymizer.from_file(config.pseudonym_key_file)
    assert sold.insured_pseudonym == key.pseudonym(raw_first)
    assert dup.insured_pseudonym == key.pseudonym(raw_second)
    wire = b"".join(e.SerializeToString() for e in events)
    for raw in (raw_first, raw_second):
        assert raw.encode() not in wire and raw.upper().encode() not in wire and raw.lower().encode() not in wire


def test_one_read_in_flight_and_own_pending_first_after_a_reconnect(target):
    _resell(target, 3)  # 6 events
    with AuditFeedClient(target) as feed:
        watch = feed.watch("order", "c1", max_batch=2, block_ms=100)
        messages: queue.Queue = queue.Queue()

        def read():
            try:
                for batch in watch:
                    messages.put(batch)
            except grpc.RpcError:  # cancelled below
                pass
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        first: list[apb.AuditEvent] = []
        try:
            while True:
                batch = messages.get(timeout=1.5)
                # In batches of max_batch at most; while nothing is acknowledged, nothing more is
                # read and no heartbeat comes either.
                assert 1 <= len(batch.events) <= 2
                first.extend(batch.events)
        except queue.Empty:
            pass
        assert len(first) >= 2 and len({e.cursor for e in first}) == len(first)
        assert feed.status("order")[1] == len(first)  # delivered, pending
        watch.cancel()  # the reader "dies" with all of it unacknowledged
        reader.join(5)

        # Reconnected under the same name: the unacknowledged events come first, then the rest.
        again = _drain(feed, "order", "c1", 6, max_batch=2)
        assert {e.cursor for e in again[:len(first)]} == {e.cursor for e in first}
        assert len({e.cursor for e in again}) == 6
        assert feed.status("order") == (0, 0)


def test_a_vanished_consumers_events_are_claimed_by_another(target):
    _resell(target, 2)  # 4 events
    with AuditFeedClient(target) as feed:
        watch = feed.watch("claims", "gone", block_ms=100)
        left = {e.cursor for e in next(watch).events}
        watch.cancel()  # never comes back, never acknowledges
        assert len(left) == 4
        taken = _drain(feed, "claims", "heir", 4, claim_idle_ms=300)
        assert {e.cursor for e in taken} == left
        assert feed.status("claims") == (0, 0)


def test_reset_replays_every_event(target):
    _resell(target, 2)
    with AuditFeedClient(target) as feed:
        once = _drain(feed, "replay", "r", 4)
        assert feed.status("replay") == (0, 0)
        assert feed.reset("replay") == 1024
        assert feed.status("replay") == (4, 0)
        twice = _drain(feed, "replay", "r", 4)
        assert [e.cursor for e in twice] == [e.cursor for e in once]
        assert feed.ack("replay", [e.cursor for e in once]) == 0  # acknowledged already


def test_bad_requests_name_their_field(target):
    with AuditFeedClient(target) as feed:
        with pytest.raises(grpc.RpcError) as err:
            next(feed.watch("", "c"))
        assert "group" in violations(err.value)
        with pytest.raises(grpc.RpcError) as err:
            next(feed.watch("g", "two words"))
        assert "consumer" in violations(err.value)
        with pytest.raises(grpc.RpcError) as err:
            next(feed.watch("g", "c", max_batch=10_001))
        assert "max_batch" in violations(err.value)
        with pytest.raises(grpc.RpcError) as err:
            feed.ack("g", ["0/1-0", "tc:{0001}:audit"])
        v = violations(err.value)
        assert list(v) == ["cursors[1]"] and "not an audit cursor" in v["cursors[1]"]
        with pytest.raises(grpc.RpcError) as err:
            feed.ack("g", ["1024/1-0"])  # no such bucket
        assert "cursors[0]" in violations(err.value)


def test_a_server_stop_ends_an_open_watch_promptly(store, config):
    srv = Server(config.replace(grace_s=10.0), store).start()
    feed = AuditFeedClient(f"127.0.0.1:{srv.port}")
    try:
        watch = feed.watch("stop", "s", block_ms=100)
        next(watch)  # a heartbeat: the call is open
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 5  # not the 10 s grace period
        with pytest.raises((StopIteration, grpc.RpcError)):
            for _ in range(100):  # heartbeats already sent, then the end of the call
                next(watch)
    finally:
        feed.close()


@pytest.fixture
def token_server(config, store, tmp_path):
    secret = tmp_path / "token.secret"
    secret.write_bytes(SECRET + b"\n")
    cfg = config.replace(auth="token", auth_token_secret_file=str(secret))
    server = Server(cfg, store, **auth.from_config(cfg).server_kwargs()).start()
    yield f"127.0.0.1:{server.port}"
    server.stop(0)


def _bearer(role: str, name: str) -> tuple:
    return (("authorization", f"Bearer {auth.issue_token(SECRET, role, name, 300)}"),)


def test_the_feed_refuses_a_pharmacy_and_serves_an_admin(token_server):
    ops = _bearer("admin", "console")
    _resell(token_server, 1, metadata=ops, site_metadata=lambda site: _bearer("site", site))
    calls = {"Watch": lambda f: next(f.watch("ledger-console", "c")), "Ack": lambda f: f.ack("ledger-console", ["0/1-0"]),
             "Reset": lambda f: f.reset("ledger-console"), "Status": lambda f: f.status("ledger-console")}
    with AuditFeedClient(token_server, metadata=_bearer("site", "PH-A")) as pharmacy, \
            AuditFeedClient(token_server) as anonymous:
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call(pharmacy)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            with pytest.raises(grpc.RpcError) as err:
                call(anonymous)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    with AuditFeedClient(token_server, metadata=ops) as admin:
        assert admin.status("ledger-console") == (2, 0)  # the pharmacy's Reset made no group
        assert len(_drain(admin, "ledger-console", "c", 2)) == 2


def test_store_reader_is_reusable_under_its_own_group(store, target):
    """An archiver (issue 25) reads the same streams through the store-level reader, with its own
    group: the console's group and its own do not disturb each other."""
    from tracecode.server.store import AuditReader, Follower
    _resell(target, 1)
    archiver = AuditReader.of(store, "archiver")
    archiver.ensure_group()
    follower = Follower(archiver, "a1", per_stream=10)
    batch = follower.next(100)
    assert batch is not None and len(batch) == 2 and {e.get("t") for e in batch} == {"DISPENSED", "ATTEMPT"}
    assert follower.next(100) is None  # its batch not acknowledged yet
    assert archiver.ack([(e.bucket, e.entry_id) for e in batch]) == 2
    assert follower.next(100) == []
    with AuditFeedClient(target) as feed:
        assert feed.status("ledger-console") == (2, 0)  # untouched by the archiver's reading


def test_the_feed_refuses_a_data_set_whose_marker_differs(store, target):
    """The server checks the data-set marker before a Watch or a Reset: events of a data set
    re-created under it with other settings are not delivered."""
    import json
    _resell(target, 1)
    key = store.keys.marker()
    saved = store.r.get(key)
    doc = json.loads(saved)
    store.r.set(key, json.dumps({**doc, "code_buckets": doc["code_buckets"] + 1}))
    try:
        with AuditFeedClient(target) as feed:
            for call in (lambda: next(feed.watch("marker", "m")), lambda: feed.reset("marker")):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "code_buckets" in err.value.details()
            assert feed.status("marker") == (2, 0)  # nothing was delivered, no group was made
    finally:
        store.r.set(key, saved)
