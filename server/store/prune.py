"""Dropping the state of packs past their expiry plus the return window.

    tracecode prune-expired [--redis-url ...]      # e.g. nightly, from cron or a Kubernetes CronJob

A pack's state matters while it can still be sold or returned: a scan after its expiry is refused
EXPIRED and its last return is possible return_window_days after its last sale, so once its expiry
lies that far in the past its entry (issuance and dispense state) and its history list can go. This
is what keeps a national data set near the packs on the market rather than every pack ever issued
(docs/scaling.md). The store keeps many codes per hash, so Redis can not expire them one by one
(per-field TTLs need Redis 7.4): this job walks every bucket instead, reading each once and
pruning in one atomic call per bucket (lua/prune.lua judges each code again). It is idempotent and
may be stopped at any point; a bucket's walk costs one HGETALL of at most a few hundred fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tracecode.rules.packing import code_of

from .layout import ENTRY_FIELDS, LOT_FIELDS, US
from .store import Store, wrap_errors

_LOT = ENTRY_FIELDS.index("lot")
_EXPIRY = LOT_FIELDS.index("expiry")


@dataclass
class PruneSummary:
    buckets: int = 0  # bucket hashes read
    codes: int = 0  # entries seen
    pruned: int = 0  # entries (and their history lists) dropped; with dry_run, those that would be
    cutoff_day: int = 0
    dry_run: bool = False


@wrap_errors
def prune_expired(store: Store, cutoff_day: int, *, batch: int = 64, dry_run: bool = False,
                  progress: Callable[[PruneSummary], None] | None = None) -> PruneSummary:
    """Drop every code whose lot expired before cutoff_day (YYYYMMDD) from `store`.
    dry_run: read and judge as usual, count the candidates, drop nothing."""
    script = store.scripts["prune"]
    keys = store.keys
    summary = PruneSummary(cutoff_day=cutoff_day, dry_run=dry_run)
    buckets = keys.buckets()
    for start in range(0, len(buckets), batch):
        chunk = buckets[start:start + batch]
        # Buckets come tag by tag, so a chunk's buckets share few lot dictionaries: each is read once.
        dictionaries = list(dict.fromkeys(lots for _, lots in chunk))
        pipe = store.r.pipeline(transaction=False)
        for bucket, _ in chunk:
            pipe.hgetall(bucket)
        for lots in dictionaries:
            pipe.hgetall(lots)
        read = pipe.execute()
        lot_fields = {lots: {lot_id: text.split(US) for lot_id, text in read[len(chunk) + i].items()}
                      for i, lots in enumerate(dictionaries)}
        calls = []
        for n, (bucket, lots) in enumerate(chunk):
            entries = read[n]
            summary.buckets += 1
            summary.codes += len(entries)
            fields = lot_fields[lots]
            stale = []
            for field, value in entries.items():
                code = code_of(field)
                lot = fields.get(value.split(US, 1)[_LOT])
                if lot and 0 < int(lot[_EXPIRY] or 0) < cutoff_day:
                    stale.append(code)
            if stale and dry_run:
                summary.pruned += len(stale)
            elif stale:
                ks = [bucket, lots]
                for c in stale:
                    ks.append(keys.history(c))
                calls.append((script, ks,
                              [cutoff_day, *stale]))
        for res in store.run_scripts(calls) if calls else []:
            if isinstance(res, Exception):
                raise res
            summary.pruned += len(res)
        if progress:
            progress(summary)
    return summary
