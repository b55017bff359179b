"""Layout 1 -> layout 2 (store/migrate.py): a data set built in the old layout, migrated in place,
answers exactly as the old layout does: the same issuance records, histories and evidence, the same
stored answers replayed, and the same verdicts, returns and replays for what comes after.

The data set is built twice by the same operations under two key prefixes of one Redis: one copy
stays in layout 1 (the oracle), the other is migrated; then both get the same new traffic."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from tracecode.server.app import make_store
from tracecode.server.store import migrate_layout1
from tracecode.server.store.keys import KeySpace
from tracecode.server.store.types import SettlementCall
from tracecode.server.verifier import Line, Verifier
from tracecode.server.store import now_ms

from factories import cn20, gtin14

_runs = itertools.count()
HIST = 5  # a small history cap, so the migration meets trimmed lists too


def _store(redis_server, config, prefix: str, layout: int):
    cfg = dataclasses.replace(config, key_prefix=prefix, store_layout=layout, history_max=HIST, code_buckets=3)
    return make_store(cfg, redis_server.url)


class World:
    """One copy of the data set: the operations, through the store as the server drives it."""

    def __init__(self, store, config):
        self.store, self.v = store, Verifier(store, config)
        self.at = now_ms()

    def settle(self, site, sid, lines, *, insured="", aon=False, dispense=True):
        lines = [Line(*ln) for ln in lines]
        plan, codes, _ = self.v._plan(lines)
        digest = self.v.digest(site, sid, self.at, aon, lines) if dispense else ""
        return self.store.verify(SettlementCall(dispense=dispense, site=site, settlement_id=sid, settled_at_ms=self.at,
                                                settle_day=self.v.settle_day(self.at), digest=digest, all_or_nothing=aon,
                                                lines=plan, codes=codes, insured=insured))

    def reverse(self, site, sid, lines=()):
        return self.store.reverse(site=site, settlement_id=sid, now_ms=self.at + 1000, window_ms=86_400_000,
                                  line_indexes=list(lines), note="returned")


def build(w: World, c: list[str], g: list[str], expired: str, unknown: str) -> list:
    """Issue, dispense, duplicate, split, return, lock and recall: every kind of state there is."""
    s = w.store
    recs = [(x, "8123456", "", "B1", 20991231, 10 if i in (6, 7) else 1, "Demo Pharma", "") for i, x in enumerate(c)]
    recs += [(x, "P-AMOX", g[0][2:16], "L1", 20991231, 1, "Demo Pharma", "") for x in g]
    recs.append((expired, "8123456", "", "B0", 20200101, 1, "Demo Pharma", ""))
    assert all(o == 1 for o in s.upsert_issuance(recs, replace=False))
    out = [
        w.settle("SITE-A", "S1", [(x, "8123456") for x in c[:5]], insured="k1.0000000000000000000000000000000a"),
        w.settle("SITE-B", "S2", [(c[0], "8123456"), (c[5], "8123456")]),
        w.settle("SITE-A", "S3", [(c[6], "8123456", 3)], insured="k1.0000000000000000000000000000000b"),
        w.settle("SITE-A", "S4", [(c[6], "8123456", 3), (c[7], "8123456", 4)]),
        w.settle("SITE-C", "S5", [(c[6], "8123456", 2)]),
        w.reverse("SITE-A", "S1", [1]),  # c1 back to zero: a new use cycle may start
        w.settle("SITE-B", "S6", [(c[1], "8123456")], insured="k1.0000000000000000000000000000000c"),
        w.settle("SITE-D", "S7", [(c[1], "8123456")]),  # DUPLICATE against the new cycle
    ]
    for k in range(8):  # more attempts than the history keeps: the first dispense must survive
        out.append(w.settle(f"SITE-X{k}", f"D{k}", [(c[2], "8123456")]))
    out.append(s.set_status([c[3]], "LOCKED", now_ms=w.at, reason="inspection", actor="admin"))
    for codes in s.batch_codes("P-AMOX", "L1"):
        out.append(s.set_status(codes, "RECALLED", now_ms=w.at, reason="contamination", actor="admin",
                                only=("P-AMOX", "L1")))
    out += [
        w.settle("SITE-A", "S8", [(c[3], "8123456"), (g[0], "P-AMOX"), (c[8], "WRONG"), ("123", "8123456"),
                                  (unknown, "8123456"), (expired, "8123456")]),
        w.settle("SITE-A", "S9", [(c[9], "8123456"), (c[0], "8123456")], aon=True),
        w.reverse("SITE-A", "S4", [0]),
        w.settle("SITE-E", "S10", [(c[10], "8123456")], insured="k1.0000000000000000000000000000000d"),
        w.reverse("SITE-E", "S10"),  # emptied with no other event: its history is only the implicit dispense + return
    ]
    return out


def traffic(w: World, c: list[str], g: list[str]) -> list:
    """What comes after the migration: replays, duplicates against old dispenses, returns of old
    settlements, new cycles, checks."""
    return [
        w.settle("SITE-B", "S2", [(c[0], "8123456"), (c[5], "8123456")]),  # a retry: the stored answer
        w.settle("SITE-F", "N1", [(c[0], "8123456"), (c[4], "8123456"), (c[11], "8123456")]),
        w.settle("SITE-A", "N2", [(c[6], "8123456", 1), (c[7], "8123456", 6), (c[7], "8123456", 1)]),
        w.settle("SITE-C", "N3", [(c[1], "8123456"), (c[10], "8123456"), (g[1], "P-AMOX")]),
        w.reverse("SITE-B", "S6"),
        w.reverse("SITE-B", "S6"),  # a second return changes nothing
        w.settle("SITE-G", "N4", [(c[1], "8123456"), (c[2], "8123456")], insured="k1.0000000000000000000000000000000e"),
        w.settle("SITE-H", "N5", [(c[2], "8123456")]),
        w.settle("SITE-H", "", [(c[2], "8123456"), (c[9], "8123456")], dispense=False),
        w.reverse("SITE-A", "S1"),
        w.settle("SITE-I", "N6", [(x, "8123456") for x in c[:5]]),
        # A recall after the move finds the batch through the moved index.
        [w.store.set_status(chunk, "RECALLED", now_ms=w.at, reason="r2", actor="admin", only=("8123456", "B1"))
         for chunk in w.store.batch_codes("8123456", "B1")],
        w.settle("SITE-J", "N7", [(c[11], "8123456")]),
    ]


def snapshot(store, codes: list[str], settlements: list[tuple[str, str]]) -> dict:
    return {"batches": {b: sorted(c for chunk in store.batch_codes(p, b) for c in chunk)
                        for p, b in (("8123456", "B1"), ("P-AMOX", "L1"), ("8123456", "B0"))},
            "issuance": [store.get_issuance(x) for x in codes],
            "history": [store.code_history(x) for x in codes],
            "stored": [store.stored_settlement(site, sid) for site, sid in settlements]}


SETTLEMENTS = [("SITE-A", "S1"), ("SITE-B", "S2"), ("SITE-A", "S3"), ("SITE-A", "S4"), ("SITE-C", "S5"),
               ("SITE-B", "S6"), ("SITE-D", "S7"), ("SITE-A", "S8"), ("SITE-A", "S9"), ("SITE-E", "S10")]


@pytest.mark.all_backends
def test_a_migrated_data_set_answers_as_the_old_layout_did(redis_server, config):
    run = next(_runs)
    c = [cn20() for _ in range(12)]
    gtin = gtin14()
    g = [f"01{gtin}21M{run}N{k}" for k in range(3)]
    expired = cn20()
    codes = c + g + [expired]
    oracle = _store(redis_server, config, f"{config.key_prefix}o{run}", 1)
    moved1 = _store(redis_server, config, f"{config.key_prefix}m{run}", 1)
    try:
        wo, wm = World(oracle, config), World(moved1, config)
        wm.at = wo.at
        unknown = cn20("8000001")  # never issued
        assert build(wo, c, g, expired, unknown) == build(wm, c, g, expired, unknown)
        before = snapshot(oracle, codes, SETTLEMENTS)
        assert before == snapshot(moved1, codes, SETTLEMENTS)
        # The history cap and the first dispense's survival are really exercised.
        h2 = before["history"][2]
        assert h2.events_total == 9 and len(h2.events) == HIST and h2.events[0].type == "DISPENSED"

        moved = _store(redis_server, config, moved1.keys.prefix, 2)
        try:
            summary = migrate_layout1(moved, chunk=4)
            assert summary.moved == len(codes) and summary.scanned == len(codes)
            # Nothing of layout 1's per-code keys is left, and a second run has nothing to do.
            old = KeySpace(moved.keys.prefix, layout=1)
            assert all(moved.r.exists(*old.code_keys(x)[:2]) == 0 for x in codes)
            assert moved.r.exists(old.batch("8123456", "B1"), old.batch("P-AMOX", "L1")) == 0
            assert migrate_layout1(moved).moved == 0

            assert snapshot(moved, codes, SETTLEMENTS) == before
            wm2 = World(moved, config)
            wm2.at = wo.at
            after_o, after_m = traffic(wo, c, g), traffic(wm2, c, g)
            assert after_m == after_o
            assert snapshot(moved, codes, SETTLEMENTS) == snapshot(oracle, codes, SETTLEMENTS)
            # The new traffic met old evidence: c0's first dispense is S1's, from before the move.
            n1 = after_o[1].rows[0]
            assert n1.verdict == "DUPLICATE" and (n1.first_site_id, n1.first_settlement_id) == ("SITE-A", "S1")
        finally:
            moved.close()
    finally:
        oracle.close()
        moved1.close()


@pytest.mark.backend_independent
def test_layout_2_keeps_a_dispensed_pack_in_one_field(redis_server, config):
    """What the migration buys: per code one entry in a shared bucket hash, no keys of its own
    until it has events beyond its first dispense."""
    store = _store(redis_server, config, f"{config.key_prefix}k{next(_runs)}", 2)
    try:
        w = World(store, config)
        c = [cn20() for _ in range(5)]
        store.upsert_issuance([(x, "8123456", "", "B1", 20991231, 1, "Demo Pharma", "") for x in c], replace=False)
        assert all(r.verdict == "OK" for r in w.settle("SITE-A", "K1", [(x, "8123456") for x in c]).rows)
        for x in c:
            bucket, lots, _, hist = store.keys.code_keys(x)
            assert store.r.hexists(bucket, x) and store.r.exists(hist) == 0
            assert store.r.hlen(lots) >= 1
        assert [e.type for e in store.code_history(c[0]).events] == ["DISPENSED"]
    finally:
        store.close()


@pytest.mark.all_backends
def test_a_redis_that_would_not_keep_buckets_compact_is_named_at_start(redis_server, config):
    store = _store(redis_server, config, f"{config.key_prefix}w{next(_runs)}", 2)
    node = store.r.get_redis_connection(store.r.get_primaries()[0]) if store.cluster else store.r
    try:
        assert store.config_warnings() == []
        node.config_set("hash-max-listpack-entries", 128)
        (warning,) = store.config_warnings()
        assert "hash-max-listpack-entries is 128 (want >= 512)" in warning
    finally:
        node.config_set("hash-max-listpack-entries", 512)
        store.close()


@pytest.mark.backend_independent
def test_the_migrate_layout_and_prune_expired_commands(redis_server, config):
    """The operators' commands, as they run them: a child process against the same Redis."""
    import subprocess
    import sys

    prefix = f"{config.key_prefix}c{next(_runs)}"
    old = _store(redis_server, config, prefix, 1)
    c = [cn20() for _ in range(4)]
    try:
        old.upsert_issuance([(x, "8123456", "", "B1", 20200101 if i == 0 else 20991231, 1, "Demo", "")
                             for i, x in enumerate(c)], replace=False)
        World(old, config).settle("SITE-A", "C1", [(x, "8123456") for x in c])
    finally:
        old.close()
    base = [sys.executable, "-m", "tracecode.clients.cli"]
    flags = ["--redis-url", redis_server.url, "--key-prefix", prefix, "--code-buckets", "3", "--metrics-port", "0"]
    out = subprocess.run(base + ["migrate-layout", *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 codes moved to layout 2 (4 layout-1 records found" in out.stdout
    # The default cutoff: today in the issuer's calendar minus the return window.
    out = subprocess.run(base + ["prune-expired", *flags], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "prune-expired: 1 expired packs dropped of 4 codes" in out.stdout
    new = _store(redis_server, config, prefix, 2)
    try:
        assert new.get_issuance(c[0]) is None
        assert new.code_history(c[1]).first_settlement_id == "C1"
    finally:
        new.close()
    bad = subprocess.run(base + ["prune-expired", *flags, "--cutoff", "2020"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be YYYYMMDD" in bad.stderr
