"""prune-expired (store/prune.py): packs past their expiry plus the return window leave Redis,
everything else stays exactly as it was."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from tracecode.server.app import make_store
from tracecode.server.store import prune_expired

from factories import cn20
from test_migration import World

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
