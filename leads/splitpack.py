"""The sequential rule, for the few packs sold in parts (拆零): units used up in time order.

Whether a split line is accepted depends on the units accepted before it, which no window
function expresses; so the lines of every pack that has a split line are judged here, one pass
per pack in REPLAY's order, exactly as verify.lua walks them (RECORD_ACCEPTED: only OK lines
change a pack's state, and bulk REPLAY never returns units). Engine-independent: both engines
hand this function the same rows (sql.SPLIT_LINES) and take its answer back as `split_v`: DuckDB
all packs in one call on the driver, Spark one pack per call on the executors (`judge_pack`,
grouped by ckey with applyInArrow).
"""
from __future__ import annotations

import pyarrow as pa

from tracecode.rules.verdicts import PRECEDENCE


# The checks in the order that picks the verdict (rules.verdicts.PRECEDENCE; a split line is
# never MALFORMED: it has a pack).
ORDER = tuple(v for v in PRECEDENCE if v != "MALFORMED")


# judge_pack's answer: each line's verdict, and on every line its pack's state after the pass.
PACK_SCHEMA = ("ord bigint, verdict string, first_ord bigint, ckey string, used bigint, first_site string, "
               "pack_first_ord bigint")


def judge_pack(rows: pa.Table) -> pa.Table:
    """One pack's lines in any order (a Spark group; with SPLIT_LINES_HISTORY's used0, site0,
    ford0 when resuming) -> its lines' verdicts, each with the pack's state after (PACK_SCHEMA)."""
    verdicts, state = judge_with_state(rows.sort_by([("ord", "ascending")]))
    n = verdicts.num_rows
    key = rows["ckey"][0].as_py() if rows.num_rows else None
    used, site, first = (state["used"][0].as_py(), state["first_site"][0].as_py(),
                         state["first_ord"][0].as_py()) if state.num_rows else (0, None, None)
    return pa.table({"ord": verdicts["ord"], "verdict": verdicts["verdict"], "first_ord": verdicts["first_ord"],
                     "ckey": pa.array([key] * n, pa.string()), "used": pa.array([used] * n, pa.int64()),
                     "first_site": pa.array([site] * n, pa.string()), "pack_first_ord": pa.array([first] * n, pa.int64())})


def judge(rows: pa.Table) -> pa.Table:
    """rows (sql.SPLIT_LINES, sorted by ckey, ord) -> (ord, verdict, first_ord) per line."""
    return judge_with_state(rows)[0]


def judge_with_state(rows: pa.Table) -> tuple[pa.Table, pa.Table]:
    """rows (sql.SPLIT_LINES, or SPLIT_LINES_HISTORY with each pack's state before this run:
    used0 units, site0 and ford0 of its first dispense) -> the verdicts, and per pack its state
    after (ckey, used, first_site, first_ord; packs with units used only), which an incremental
    run's state keeps (state.py)."""
    names = ("ord", "ckey", "site_id", "units", "n", "f_dir", "f_unknown", "f_blocked", "pm", "ex", "whole")
    cols = {c: rows[c].to_pylist() for c in names}
    total = rows.num_rows
    start_state = all(c in rows.column_names for c in ("used0", "site0", "ford0"))
    used0 = rows["used0"].to_pylist() if start_state else [0] * total
    site0 = rows["site0"].to_pylist() if start_state else [None] * total
    ford0 = rows["ford0"].to_pylist() if start_state else [None] * total
    out_ord, out_v, out_first = [], [], []
    st_key, st_used, st_site, st_first = [], [], [], []
    start = 0
    while start < total:
        key = cols["ckey"][start]
        end = start
        while end < total and cols["ckey"][end] == key:
            end += 1
        used, first_site, first_ord = used0[start] or 0, site0[start], ford0[start]
        verdicts = []
        for i in range(start, end):
            n, units, site = cols["n"][i], cols["units"][i], cols["site_id"][i]
            want = units if units > 0 else n
            # Every check that fails, as verify.lua sets its flags; the first in ORDER is the verdict.
            failing = {
                "DUPLICATE_IN_REQUEST": cols["f_dir"][i], "UNKNOWN": cols["f_unknown"][i],
                "BLOCKED": cols["f_blocked"][i],
                "DUPLICATE": used > 0 and (site != first_site or (cols["whole"][i] and used >= n)),
                "PRODUCT_MISMATCH": cols["pm"][i], "EXPIRED": cols["ex"][i],
                "QUANTITY_EXCEEDED": want > n - used,
            }
            v = next((c for c in ORDER if failing[c]), "OK")
            if v == "OK":
                if used == 0:
                    first_site, first_ord = site, cols["ord"][i]
                used += want
            verdicts.append(v)
        out_ord.extend(cols["ord"][start:end])
        out_v.extend(verdicts)
        out_first.extend([first_ord] * (end - start))
        if used > 0:
            st_key.append(key)
            st_used.append(used)
            st_site.append(first_site)
            st_first.append(first_ord)
        start = end
    verdict_table = pa.table({"ord": pa.array(out_ord, pa.int64()), "verdict": pa.array(out_v, pa.string()),
                              "first_ord": pa.array(out_first, pa.int64())})
    state = pa.table({"ckey": pa.array(st_key, pa.string()), "used": pa.array(st_used, pa.int64()),
                      "first_site": pa.array(st_site, pa.string()), "first_ord": pa.array(st_first, pa.int64())})
    return verdict_table, state
