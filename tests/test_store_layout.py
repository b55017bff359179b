"""The store's key layout (store/keys.py) and the data-set marker (store/marker.py) that guards
it: a server, a bulk job and a pruning run each refuse a data set written with other settings,
naming the field and both values; and `World`, the operations as the server drives the store,
for the store-level tests."""
from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import grpc
import pytest

from tracecode.v1 import bulk_pb2, bulk_pb2_grpc
from tracecode.rules import packing
from tracecode.rules.packing import code_field
from tracecode.rules.pseudonym import Pseudonymizer
from tracecode.rules.schema import ENTRY_FIELDS, US
from tracecode.server.app import Server, make_store, prune_expired
from tracecode.server.errors import DataSetMismatch
from tracecode.server.store import DataSetMarker, now_ms
from tracecode.server.store.keys import LAYOUT
from tracecode.server.store.types import SettlementCall
from tracecode.server.verifier import Line, Verifier

from factories import cn20

_runs = itertools.count()
HIST = 5


def _store(redis_server, config, prefix: str, **overrides):
    cfg = dataclasses.replace(config, key_prefix=prefix, history_max=HIST, code_buckets=3, **overrides)
    return make_store(cfg, redis_server.url)


class World:
    """One copy of the data set: the operations, through the store as the server drives it."""

    def __init__(self, store, config):
        self.store, self.v = store, Verifier(store, config)
        self.at = now_ms()

    def settle(self, site, sid, lines, *, insured="", aon=False, dispense=True):
        lines = [Line(*ln) for ln in lines]
        plan, codes, _ = self.v.plan_lines(lines)
        digest = self.v.digest(site, sid, self.at, aon, lines) if dispense else ""
        return self.store.verify(SettlementCall(dispense=dispense, site=site, settlement_id=sid, settled_at_ms=self.at,
                                                settle_day=self.v.settle_day(self.at), digest=digest, all_or_nothing=aon,
                                                lines=plan, codes=codes, insured=insured))

    def reverse(self, site, sid, lines=()):
        return self.store.reverse(site=site, settlement_id=sid, now_ms=self.at + 1000, window_ms=86_400_000,
                                  line_indexes=list(lines), note="returned")



@pytest.mark.backend_independent
def test_a_plain_first_dispense_is_written_short_and_every_reader_sees_it_whole(redis_server, config):
    """Layout 4: the commonest entry, a pack whose one event is its first dispense and whose
    cycle used what that dispense took, writes ev '=' for (ev 1, fd 0, fu = u) and line 0 as
    nothing; the history, a later event, a continuation and a return read and rewrite it whole."""
    store = _store(redis_server, config, f"{config.key_prefix}e{next(_runs)}")
    try:
        w = World(store, config)
        whole = [cn20() for _ in range(3)]
        split = cn20()
        store.upsert_issuance([(x, "8123456", "", "B1", 20991231, 1, "Demo Pharma", "") for x in whole]
                              + [(split, "8123456", "", "B1", 20991231, 10, "Demo Pharma", "")], replace=False)
        rows = w.settle("SITE-A", "P1", [(x, "8123456") for x in whole] + [(split, "8123456", 3)]).rows
        assert [r.verdict for r in rows] == ["OK"] * 4

        def raw(code):
            bucket = store.keys.code_keys(code)[0]
            return dict(zip(ENTRY_FIELDS, store.r.hget(bucket, code_field(code)).split(US)))

        for i, x in enumerate([*whole, split]):
            f = raw(x)
            assert f["ev"] == "=" and f.get("fd", "") == "" and f.get("fu", "") == "", f
            assert f.get("fl", "") == ("" if i == 0 else str(i))
            (event,) = store.code_history(x).events
            assert (event.type, event.site_id, event.settlement_id, event.line_index, event.units) == \
                ("DISPENSED", "SITE-A", "P1", i, 3 if x == split else 1)
        # A continuation of the split pack: the cycle has used more than the first dispense took.
        assert w.settle("SITE-A", "P2", [(split, "8123456", 2)]).rows[0].verdict == "OK"
        assert raw(split)["ev"] == "2"
        assert [(e.settlement_id, e.line_index, e.units) for e in store.code_history(split).events] == \
            [("P1", 3, 3), ("P2", 0, 2)]
        # Another site's attempt on a whole pack: a second event.
        assert w.settle("SITE-B", "Q1", [(whole[1], "8123456")]).rows[0].verdict == "DUPLICATE"
        assert raw(whole[1])["ev"] == "2"
        assert [(e.type, e.settlement_id, e.line_index) for e in store.code_history(whole[1]).events] == \
            [("DISPENSED", "P1", 1), ("ATTEMPT", "Q1", 0)]
        # A return empties a pack: the first dispense is written out into the list first.
        w.reverse("SITE-A", "P1", [2])
        history = store.code_history(whole[2])
        assert [(e.type, e.settlement_id, e.line_index, e.units) for e in history.events] == \
            [("DISPENSED", "P1", 2, 1), ("REVERSED", "P1", 2, 1)]
        assert history.units_used == 0 and raw(whole[2])["ev"] == "2"
        # The untouched pack still reads whole.
        assert store.code_history(whole[0]).events[0].units == 1 and store.code_history(whole[0]).events_total == 1
    finally:
        store.close()


@pytest.mark.backend_independent
def test_a_dispensed_pack_is_one_field_of_a_shared_hash(redis_server, config):
    """Per code one entry in a shared bucket hash, no keys of its own until it has events beyond
    its first dispense (store/keys.py)."""
    store = _store(redis_server, config, f"{config.key_prefix}k{next(_runs)}")
    try:
        w = World(store, config)
        c = [cn20() for _ in range(5)]
        store.upsert_issuance([(x, "8123456", "", "B1", 20991231, 1, "Demo Pharma", "") for x in c], replace=False)
        person = Pseudonymizer(b"k" * 32).pseudonym("110105194912310021")
        assert all(r.verdict == "OK" for r in w.settle("SITE-A", "K1", [(x, "8123456") for x in c], insured=person).rows)
        for x in c:
            bucket, lots, _, hist = store.keys.code_keys(x)
            assert not store.r.hexists(bucket, x) and store.r.exists(hist) == 0
            # Packed (rules/packing.py): the code in 12 characters, the lot by its small id in the
            # tag, the time in 7 characters, the pseudonym's MAC in 22.
            entry = store.r.hget(bucket, code_field(x)).split(US)
            fields = dict(zip(ENTRY_FIELDS, entry))
            assert len(code_field(x)) == 12 and fields["lot"].isdigit() and int(fields["lot"]) <= store.r.hlen(lots)
            assert packing.ms_of(fields["fa"]) == w.at and len(fields["fa"]) == 7
            assert packing.hex128_of(fields["fp"]) == person and len(fields["fp"]) == len(person) - 10
            assert fields["at"] == ""
        assert not [k for k in store.r.scan_iter(f"{store.keys.prefix}:*:B:*")]  # no batch index: a recall scans
        history = store.code_history(c[0])
        assert [e.type for e in history.events] == ["DISPENSED"]
        assert (history.first_settled_at_ms, history.first_insured_id, history.first_site_id) == (w.at, person, "SITE-A")
        # A recall finds the batch's codes by their lot ids in every tag, whatever their kind, and
        # only them (another batch of the product, the batch name of another product, a code moved away).
        gs1 = [f"0106901234567908{21}SN{n:08d}" for n in range(40)]
        others = [cn20() for _ in range(30)]
        store.upsert_issuance([(x, "8123456", "06901234567908", "B1", 20991231, 1, "Demo Pharma", "") for x in gs1]
                              + [(x, "8123456", "", "B2", 20991231, 1, "Demo Pharma", "") for x in others[:10]]
                              + [(x, "8123457", "", "B1", 20991231, 1, "Demo Pharma", "") for x in others[10:20]]
                              + [(x, "8123456", "", "B1", 20991231, 2, "Demo Pharma", "") for x in others[20:]],
                              replace=False)
        store.upsert_issuance([(others[20], "8123456", "", "B9", 20991231, 2, "Demo Pharma", "")], replace=True)
        want = sorted(c + gs1 + others[21:])
        assert sorted(x for chunk in store.batch_codes("8123456", "B1", chunk=7, buckets_per_call=2) for x in chunk) == want
    finally:
        store.close()


@pytest.mark.all_backends
def test_a_redis_that_would_not_keep_buckets_compact_is_named_at_start(redis_server, config):
    store = _store(redis_server, config, f"{config.key_prefix}w{next(_runs)}")
    node = store.r.get_redis_connection(store.r.get_primaries()[0]) if store.cluster else store.r
    try:
        assert store.config_warnings() == []
        node.config_set("hash-max-listpack-entries", 128)
        (warning,) = store.config_warnings()
        assert "hash-max-listpack-entries is 128 (want >= 512)" in warning
    finally:
        node.config_set("hash-max-listpack-entries", 512)
        store.close()




# ------------------------------------------------------------------ the data-set marker

# Per compared field: a value the data set's marker holds instead of this process's.
OTHER = {"layout": LAYOUT - 1, "buckets": 4096, "code_buckets": 7, "key_id": "k9", "key_fingerprint": "00" * 8}


def _marker(store) -> dict:
    return json.loads(store.r.get(store.keys.marker()))


def _tamper(store, field: str) -> tuple[object, object]:
    """Rewrite the marker with `field` changed; returns (the data set's value now, ours)."""
    doc = _marker(store)
    ours = doc[field]
    doc[field] = OTHER[field]
    store.r.set(store.keys.marker(), json.dumps(doc))
    return OTHER[field], ours


def _names_both(message: str, field: str, theirs, ours) -> bool:
    return f"{field} is {theirs!r} in the data set, {ours!r} here" in message


@pytest.mark.all_backends
def test_the_first_server_writes_the_marker_the_next_finds_it(redis_server, config):
    store = _store(redis_server, config, f"{config.key_prefix}m{next(_runs)}")
    key = Pseudonymizer.from_file(config.pseudonym_key_file)
    try:
        assert store.r.get(store.keys.marker()) is None
        first = Server(dataclasses.replace(config, key_prefix=store.keys.prefix, code_buckets=3), store)
        doc = _marker(store)
        assert {k: doc[k] for k in ("layout", "buckets", "code_buckets", "key_id", "key_fingerprint")} == {
            "layout": LAYOUT, "buckets": 1024, "code_buckets": 3, "key_id": key.key_id, "key_fingerprint": key.fingerprint()}
        assert key.fingerprint() not in open(config.pseudonym_key_file).read()  # tells keys apart, reveals nothing
        second = Server(dataclasses.replace(config, key_prefix=store.keys.prefix, code_buckets=3), store)
        assert _marker(store) == doc
        for srv in (first, second):
            srv.stop(0)
    finally:
        store.close()


@pytest.mark.parametrize("field", list(OTHER))
@pytest.mark.backend_independent
def test_a_server_refuses_a_data_set_of_other_settings(redis_server, config, field):
    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}s{next(_runs)}", code_buckets=3)
    store = make_store(cfg, redis_server.url)
    try:
        Server(cfg, store).stop(0)  # writes the marker
        theirs, ours = _tamper(store, field)
        with pytest.raises(DataSetMismatch) as err:
            Server(cfg, store)
        assert _names_both(str(err.value), field, theirs, ours), str(err.value)
    finally:
        store.close()


@pytest.mark.backend_independent
def test_serve_refuses_to_start_and_says_why(redis_server, config):
    """As an operator meets it: `tracecode serve` with another --code-buckets exits 2, naming both."""
    prefix = f"{config.key_prefix}v{next(_runs)}"
    cfg = dataclasses.replace(config, key_prefix=prefix, code_buckets=3)
    store = make_store(cfg, redis_server.url)
    try:
        Server(cfg, store).stop(0)
    finally:
        store.close()
    out = subprocess.run([sys.executable, "-m", "tracecode.cli", "serve", "--redis-url", redis_server.url,
                          "--key-prefix", prefix, "--code-buckets", "5", "--metrics-port", "0", "--listen", "127.0.0.1:0",
                          "--pseudonym-key-file", config.pseudonym_key_file, "--workers", "1",
                          *(["--redis-cluster"] if redis_server.cluster else [])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "code_buckets is 3 in the data set, 5 here" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("field", list(OTHER))
@pytest.mark.backend_independent
def test_a_bulk_job_refuses_a_data_set_changed_under_its_server(redis_server, config, field):
    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}b{next(_runs)}", code_buckets=3)
    store = make_store(cfg, redis_server.url)
    server = Server(cfg, store).start()
    try:
        theirs, ours = _tamper(store, field)
        stub = bulk_pb2_grpc.BulkVerificationStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Reverify(iter([bulk_pb2.ReverifyRequest(options=bulk_pb2.JobOptions(mode=bulk_pb2.REPLAY,
                                                                                           job_id="m1"))]), timeout=10))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _names_both(err.value.details(), field, theirs, ours), err.value.details()
    finally:
        server.stop(0)
        store.close()


@pytest.mark.parametrize("field", list(OTHER))
@pytest.mark.backend_independent
def test_prune_expired_refuses_a_data_set_of_other_settings(redis_server, config, field):
    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}p{next(_runs)}", code_buckets=3,
                              redis_url=redis_server.url)
    store = make_store(cfg, redis_server.url)
    try:
        Server(cfg, store).stop(0)
        assert prune_expired(cfg).pruned == 0  # the marker matches: the run goes ahead
        theirs, ours = _tamper(store, field)
        with pytest.raises(DataSetMismatch) as err:
            prune_expired(cfg)
        assert _names_both(str(err.value), field, theirs, ours), str(err.value)
    finally:
        store.close()


@pytest.mark.backend_independent
def test_prune_expired_refuses_a_data_set_without_a_marker(redis_server, config):
    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}n{next(_runs)}", redis_url=redis_server.url)
    with pytest.raises(DataSetMismatch) as err:
        prune_expired(cfg)
    assert "no data-set marker under key prefix" in str(err.value)


@pytest.mark.backend_independent
def test_no_script_runs_on_a_data_set_not_yet_checked(redis_server, config):
    """Redis down when the server started: the first call checks the marker before its script."""
    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}l{next(_runs)}", code_buckets=3)
    store = make_store(cfg, redis_server.url)
    try:
        Server(cfg, store).stop(0)
        theirs, ours = _tamper(store, "code_buckets")
        later = make_store(cfg, redis_server.url)
        later.expect_dataset(DataSetMarker(3), create=False)  # as a start with Redis down leaves it
        with pytest.raises(DataSetMismatch):
            later.upsert_issuance([(cn20(), "8123456", "", "B", 20991231, 1, "Demo", "")], replace=False)
        assert not [k for k in store.r.scan_iter(f"{cfg.key_prefix}:*:L", count=1000)]
        later.close()
    finally:
        store.close()
