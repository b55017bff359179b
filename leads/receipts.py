"""Receipts (入库核验 records) for the UNRECEIVED model: which site took which pack into stock, when.

Files of the shape `tracecode receive` sends (files.md's readers: CSV, JSONL, .gz, Parquet), one
row per pack received: `site_id`, `code` (any scan form; canonicalised by the codec as the
settlement lines are), `received_at` (ISO 8601 with an offset; empty: before any sale), and
`delivery_id`, `product_id`, `supplier` kept for the reader, not judged. A row that cannot be
used goes to errors.csv by file, line and field, as every other input's.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from tracecode.rules.rows import check_id, settled_at_ms

from . import canon
from .inputs import InputError, read_table

RECEIPT_FIELDS = {"site_id": True, "code": True, "received_at": False, "delivery_id": False, "product_id": False,
                  "supplier": False}


def empty() -> pa.Table:
    return pa.table({"site_id": pa.array([], pa.string()), "ckey": pa.array([], pa.string()),
                     "received_ms": pa.array([], pa.int64())})


def read_receipts(paths: list[str], profile, errors: list[InputError]) -> pa.Table:
    """(site_id, ckey, received_ms) of every usable receipt row of the files."""
    parts = [empty()]
    for path in paths:
        t = read_table(path, RECEIPT_FIELDS, errors)
        keep, sites, at = [], [], []
        keys = canon.canonical_keys(t["code"], profile).to_pylist()
        for ln, site, text, key in zip(t["line"].to_pylist(), t["site_id"].to_pylist(), t["received_at"].to_pylist(),
                                       keys):
            bad = check_id(site)
            if bad:
                errors.append(InputError(path, ln, "site_id", bad))
            elif not key:
                errors.append(InputError(path, ln, "code", "not a traceability code the codec reads"))
            else:
                ms = settled_at_ms(text) if text else 0
                if isinstance(ms, str):
                    errors.append(InputError(path, ln, "received_at", ms))
                else:
                    keep.append(True)
                    sites.append(site)
                    at.append(ms)
                    continue
            keep.append(False)
        mask = pa.array(keep, pa.bool_())
        parts.append(pa.table({"site_id": pa.array(sites, pa.string()),
                               "ckey": pc.filter(pa.array(keys, pa.string()), mask),
                               "received_ms": pa.array(at, pa.int64())}))
    return pa.concat_tables(parts)
