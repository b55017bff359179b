"""Moving a data set from layout 1 to layout 2 (keys.py), in place, under the same key prefix.

    tracecode migrate-layout --redis-url redis://... [--cluster] [--code-buckets N]

What moves: each code's issuance hash, dispense hash and history list become one entry in its
bucket hash, its lot in the tag's lot dictionary, and its history list keeps the events beyond the
first dispense (lua/migrate.lua, atomic per chunk of codes of one slot: a code is wholly in one
layout or the other at every instant). What stays as it is: settlement records (layout 2 reads
layout 1's JSON results, so every stored settlement still replays byte for byte and can still be
returned), audit streams and sanctions. The batch index moves into each tag (keys.py); layout 1's
batch sets are deleted once every code has moved.

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
    skipped: int = 0  # found but not moved now: gone or changed since (a later run moves them)


def _keys(store: Store, pattern: str, count: int) -> Iterator[str]:
    """Every key matching `pattern`, on every master of a cluster."""
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
        pipe = store.r.pipeline(transaction=False)
        for code in codes:
            pipe.hmget(old.issuance(code), "p", "b")
        keys: list[str] = []
        args: list[str] = []
        for code, (product, batch) in zip(codes, pipe.execute()):
            i, d, h = old.code_keys(code)
            bucket, lots, _, _ = store.keys.code_keys(code)
            product, batch = product or "", batch or ""
            keys += [i, d, h, bucket, lots, store.keys.batch_part(product, batch, code)]
            args += [code, product, batch]
        (res,) = store._run([(script, keys, args)], durable=True)
        if isinstance(res, Exception):
            raise res
        moved = sum(int(x) for x in res)
        summary.moved += moved
        summary.skipped += len(codes) - moved
        if progress:
            progress(summary)

    marker = ":i:"
    for key in _keys(store, f"{store.keys.prefix}:{{*}}:i:*", scan_count):  # layout 1's issuance records
        code = key[key.index(marker) + len(marker):]
        summary.scanned += 1
        slot = slot_of(code) if store.cluster else 0
        pending.setdefault(slot, []).append(code)
        if len(pending[slot]) >= chunk:
            flush(slot)
    for slot in list(pending):
        flush(slot)
    if summary.scanned == summary.moved:
        # Every code is in layout 2 with its batch index: layout 1's batch sets go (SCAN again:
        # the sets live in the batches' slots, not the codes').
        for key in _keys(store, f"{store.keys.prefix}:{{*}}:b:*", scan_count):
            store.r.unlink(key)
    return summary
