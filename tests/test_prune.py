"""prune-expired (store/prune.py): packs past their expiry plus the return window leave Redis,
everything else stays exactly as it was."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from tracecode.server.app import Server, make_store
from tracecode.server.store import prune_expired

from factories import cn20
from test_store_layout import World

_runs = itertools.count()


@pytest.mark.all_backends
def test_expired_packs_go_and_the_rest_is_untouched(redis_server, config):
    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}p{next(_runs)}", code_buckets=2)
    store = make_store(cfg, redis_server.url)
    try:
        w = World(store, cfg)
        old = [cn20() for _ in range(6)]
        live = [cn20() for _ in range(6)]
        undated = cn20()
        recs = [(c, "8123456", "", "B-OLD", 20240131, 1, "Demo", "") for c in old]
        recs += [(c, "8123456", "", "B-NEW", 20991231, 1, "Demo", "") for c in live]
        recs.append((undated, "8123456", "", "", 0, 1, "Demo", ""))
        store.upsert_issuance(recs, replace=False)
        w.settle("SITE-A", "P1", [(c, "8123456") for c in live[:3]])
        w.settle("SITE-B", "P2", [(live[0], "8123456"), (old[0], "8123456")])  # a duplicate and an EXPIRED attempt
        kept = {c: store.code_history(c) for c in live + [undated]}
        assert store.code_history(old[0]).events_total == 1

        summary = prune_expired(store, 20240201)
        assert summary.pruned == len(old) and summary.codes == len(recs)
        assert summary.buckets == 1024 * 2
        for c in old:
            assert store.get_issuance(c) is None
            assert store.code_history(c).events_total == 0 and store.r.exists(store.keys.history(c)) == 0
        assert sorted(c for codes in store.batch_codes("8123456", "B-OLD") for c in codes) == []
        assert {c: store.code_history(c) for c in live + [undated]} == kept
        # Nothing more to do; a pruned pack scanned again is refused as unknown.
        assert prune_expired(store, 20240201).pruned == 0
        assert w.settle("SITE-C", "P3", [(old[1], "8123456")]).rows[0].verdict == "UNKNOWN"
        # A cutoff before the expiry keeps the pack.
        assert prune_expired(store, 20240131).pruned == 0
    finally:
        store.close()


@pytest.mark.all_backends
def test_a_return_of_a_pruned_pack_is_refused_and_writes_nothing(redis_server, config):
    """Issue 23, 3: a return whose pack was pruned answered units_returned=1 and wrote an event for
    a code that has no record. Now the whole return is refused, naming the line, and nothing
    changes, not even the other line's pack."""
    from tracecode.server.errors import PackPruned

    cfg = dataclasses.replace(config, key_prefix=f"{config.key_prefix}p{next(_runs)}", code_buckets=2)
    store = make_store(cfg, redis_server.url)
    try:
        w = World(store, cfg)
        soon, later = cn20(), cn20()
        store.upsert_issuance([(soon, "8123456", "", "B-SOON", 20991230, 1, "Demo", ""),
                               (later, "8123456", "", "B-LATE", 21001231, 1, "Demo", "")], replace=False)
        assert [r.verdict for r in w.settle("SITE-A", "R1", [(soon, "8123456"), (later, "8123456")]).rows] == ["OK", "OK"]
        assert prune_expired(store, 20991231).pruned == 1  # forced far ahead, as only a store-level call can
        audit_before = sum(store.r.xlen(k) for k in store.keys.audit_streams())
        with pytest.raises(PackPruned) as err:
            w.reverse("SITE-A", "R1")
        assert err.value.index == 0 and soon in str(err.value) and "pruned" in str(err.value)
        with pytest.raises(PackPruned):
            w.reverse("SITE-A", "R1", [0])
        assert store.get_issuance(soon) is None and store.code_history(soon).events_total == 0
        assert store.code_history(later).units_used == 1  # the other line was not returned either
        assert sum(store.r.xlen(k) for k in store.keys.audit_streams()) == audit_before
        # The live line alone can still be returned.
        (line,) = w.reverse("SITE-A", "R1", [1])
        assert (line.line_index, line.canonical_code, line.units_returned) == (1, later, 1)
        assert store.code_history(later).units_used == 0
    finally:
        store.close()


@pytest.mark.backend_independent
def test_prune_expired_refuses_a_cutoff_after_today_and_dry_runs(redis_server, config):
    """Issue 23, 3: `--cutoff` two days ahead dropped packs that had not expired (they then scanned
    UNKNOWN). Now refused unless --force; --dry-run says what would go and drops nothing."""
    import subprocess
    import sys
    from datetime import date, timedelta

    prefix = f"{config.key_prefix}f{next(_runs)}"
    cfg = dataclasses.replace(config, key_prefix=prefix, code_buckets=3)
    store = make_store(cfg, redis_server.url)
    tomorrow = date.today() + timedelta(days=1)
    day = int(tomorrow.strftime("%Y%m%d"))
    live = [cn20() for _ in range(3)]
    try:
        Server(cfg, store).stop(0)  # a server's first start writes the data-set marker prune checks
        store.upsert_issuance([(c, "8123456", "", "B-T", day, 1, "Demo", "") for c in live], replace=False)
    finally:
        store.close()
    base = [sys.executable, "-m", "tracecode.cli", "prune-expired", "--redis-url", redis_server.url,
            "--key-prefix", prefix, "--code-buckets", "3", "--metrics-port", "0"]
    ahead = (tomorrow + timedelta(days=2)).strftime("%Y%m%d")

    out = subprocess.run(base + ["--cutoff", ahead], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "after today" in out.stderr and "--force" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    dry = subprocess.run(base + ["--cutoff", ahead, "--force", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert f"would drop 3 packs expiring before {ahead}" in dry.stdout and "dry run" in dry.stdout
    store = make_store(cfg, redis_server.url)
    try:
        assert all(store.get_issuance(c) is not None for c in live)  # neither run dropped anything
    finally:
        store.close()
    forced = subprocess.run(base + ["--cutoff", ahead, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and "dropped 3 packs" in forced.stdout, forced.stderr
