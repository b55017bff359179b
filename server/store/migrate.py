"""Moving a data set from layout 1 to layout 2 (keys.py), in place, under the same key prefix.

    tracecode migrate-layout --redis-url redis://... [--cluster] [--code-buckets N]

What moves: each code's issuance hash, dispense hash and history list become one entry in its
bucket hash, its lot in the tag's lot dictionary, and its history list keeps the events beyond the
first dispense (lua/migrate.lua, atomic per chunk of codes of one slot: a code is wholly in one
layout or the other at every instant). What stays as it is: settlement records (layout 2 reads
layout 1's JSON results, so every stored settlement still replays byte for byte and can still be
returned), audit streams, the batch index and sanctions.

The run is idempotent and resumable: it scans for layout-1 issuance keys, and a code already moved
has none left. Run it with the servers stopped, or switched to layout 2 only after it finished:
a layout-1 server does not see moved codes and a layout-2 one does not see unmoved ones. Bulk-job
namespaces are not moved (finish or drop running jobs first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .keys import KeySpace, slot_of
from .store import Store, wrap_errors


@dataclass
class MigrationSummary:
    scanned: int = 0  # layout-1 issuance keys found
    moved: int = 0  # codes written into layout 2 by this run
    skipped: int = 0  # found but gone by the time their chunk ran (moved concurrently)


def _issuance_keys(store: Store, prefix: str, count: int) -> Iterator[str]:
    """Every layout-1 issuance key ({p}:{tag}:i:{code}), on every master of a cluster."""
    pattern = f"{prefix}:{{*}}:i:*"
    if store.cluster:
        yield from store.r.scan_iter(match=pattern, count=count, target_nodes=store.r.PRIMARIES)
    else:
        yield from store.r.scan_iter(match=pattern, count=count)


@wrap_errors
def migrate_layout1(store: Store, *, chunk: int = 200, scan_count: int = 1000,
                    progress: Callable[[MigrationSummary], None] | None = None) -> MigrationSummary:
    """Move every code of `store`'s prefix from layout 1 to layout 2 (`store` runs layout 2)."""
    if store.layout != 2:
        raise ValueError("migrate_layout1 writes layout 2: give it a layout-2 store")
    old = KeySpace(store.keys.prefix, layout=1)
    script = store._scripts["migrate"]
    summary = MigrationSummary()
    pending: dict[int, list[str]] = {}

    def flush(slot: int) -> None:
        codes = pending.pop(slot)
        keys: list[str] = []
        for code in codes:
            i, d, h = old.code_keys(code)
            bucket, lots, _, _ = store.keys.code_keys(code)
            keys += [i, d, h, bucket, lots]
        (res,) = store._run([(script, keys, codes)], durable=True)
        if isinstance(res, Exception):
            raise res
        moved = sum(int(x) for x in res)
        summary.moved += moved
        summary.skipped += len(codes) - moved
        if progress:
            progress(summary)

    marker = ":i:"
    for key in _issuance_keys(store, store.keys.prefix, scan_count):
        code = key[key.index(marker) + len(marker):]
        summary.scanned += 1
        slot = slot_of(code) if store.cluster else 0
        pending.setdefault(slot, []).append(code)
        if len(pending[slot]) >= chunk:
            flush(slot)
    for slot in list(pending):
        flush(slot)
    return summary
