"""The sequential rule, for the few packs sold in parts (拆零): units used up in time order.

Whether a split line is accepted depends on the units accepted before it, which no window
function expresses; so the lines of every pack that has a split line are judged here, one pass
per pack in REPLAY's order, exactly as verify.lua walks them (RECORD_ACCEPTED: only OK lines
change a pack's state, and bulk REPLAY never returns units). Engine-independent: both engines
hand this function the same rows (sql.SPLIT_LINES) and take its answer back as `split_v`.
"""
from __future__ import annotations

import pyarrow as pa


def judge(rows: pa.Table) -> pa.Table:
    """rows (sql.SPLIT_LINES, sorted by ckey, ord) -> (ord, verdict, first_ord) per line."""
    cols = {c: rows[c].to_pylist() for c in ("ord", "ckey", "site_id", "units", "n", "static_v", "pm", "ex", "whole")}
    out_ord, out_v, out_first = [], [], []
    start = 0
    total = rows.num_rows
    while start < total:
        key = cols["ckey"][start]
        end = start
        while end < total and cols["ckey"][end] == key:
            end += 1
        used, first_site, first_ord = 0, None, None
        verdicts = []
        for i in range(start, end):
            n, units, site = cols["n"][i], cols["units"][i], cols["site_id"][i]
            want = units if units > 0 else n
            if cols["static_v"][i] is not None:
                v = cols["static_v"][i]
            elif used > 0 and (site != first_site or (cols["whole"][i] and used >= n)):
                v = "DUPLICATE"
            elif cols["pm"][i]:
                v = "PRODUCT_MISMATCH"
            elif cols["ex"][i]:
                v = "EXPIRED"
            elif want > n - used:
                v = "QUANTITY_EXCEEDED"
            else:
                v = "OK"
                if used == 0:
                    first_site, first_ord = site, cols["ord"][i]
                used += want
            verdicts.append(v)
        out_ord.extend(cols["ord"][start:end])
        out_v.extend(verdicts)
        out_first.extend([first_ord] * (end - start))
        start = end
    return pa.table({"ord": pa.array(out_ord, pa.int64()), "verdict": pa.array(out_v, pa.string()),
                     "first_ord": pa.array(out_first, pa.int64())})
