"""The leads' outputs written column-wise are the bytes the row-wise rules give: the evidence's
times (every time zone's offsets, milliseconds or not), amounts (negative, zero, null) and CSV
cells (formula-like text neutralised, commas, quotes, newlines, carriage returns, non-ASCII)."""
from __future__ import annotations

import csv
import random
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from tracecode.leads import run
from tracecode.leads.assemble import fmt_amount, fmt_amounts, fmt_time, fmt_times
from tracecode.rules.cells import neutralise_row


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "America/New_York", "Australia/Lord_Howe", "Africa/Monrovia",
                                  "Asia/Kathmandu", "America/St_Johns", "UTC"])
def test_times_column_wise_are_fmt_time(zone):
    rnd = random.Random(zone)
    tz = ZoneInfo(zone)
    values = ([rnd.randrange(0, 4_102_444_800_000) for _ in range(5000)]
              + [rnd.randrange(0, 4_102_444_800) * 1000 for _ in range(2000)]
              + [0, 1, 999, 1000, 63_072_000_000 + 2_670_000, 1_710_054_000_000, 1_710_057_600_000 - 1])
    assert fmt_times(pa.array(values, pa.int64()), tz).to_pylist() == [fmt_time(v, tz) for v in values]


def test_amounts_column_wise_are_fmt_amount():
    rnd = random.Random(7)
    values = [None, 0, 1, -1, 5, -5, 99, 100, -100, 12345, 10**15 + 3, -(10**15) - 7] + \
        [rnd.randrange(-10**9, 10**9) for _ in range(3000)]
    assert fmt_amounts(pa.array(values, pa.int64())).to_pylist() == [fmt_amount(v) for v in values]


def test_a_table_written_column_wise_is_the_csv_modules_bytes(tmp_path):
    rnd = random.Random(3)
    pieces = ["a", "S0001", "=HYPERLINK(\"http://x\",\"y\")", "+1", "-0.05", "@SUM(A1)", "\tx", "\rx", "x,y", 'q"q',
              "line\nbreak", "cr\rinside", "", "药店", " lead ", "'=already", "-", "x\n", None]
    header = ("lead_id", "role", "line_no", "amount")
    rows = [(rnd.choice(pieces), rnd.choice(pieces), rnd.randrange(0, 10**6), rnd.choice(pieces)) for _ in range(3000)]
    table = pa.table({"lead_id": pa.array([r[0] for r in rows], pa.string()),
                      "role": pa.array([r[1] for r in rows], pa.string()),
                      "line_no": pa.array([r[2] for r in rows], pa.int64()),
                      "amount": pa.array([r[3] for r in rows], pa.string())})
    run.write_csv_table(str(tmp_path / "columns.csv"), header, table)
    run.write_csv(str(tmp_path / "rows.csv"), header, rows)
    assert (tmp_path / "columns.csv").read_bytes() == (tmp_path / "rows.csv").read_bytes()
    # And it reads back as it was meant (rows without a bare carriage return: the csv module
    # leaves '\r' unquoted under a '\n' line end, as both writers do; the row rules refuse
    # control characters in ids, so none reaches the outputs).
    plain = [r for r in rows if not any(isinstance(c, str) and "\r" in c for c in r)]
    run.write_csv_table(str(tmp_path / "plain.csv"), header, table.filter(pa.array([r in plain for r in rows])))
    with open(tmp_path / "plain.csv", newline="", encoding="utf-8") as fh:
        back = list(csv.reader(fh))
    assert back[1:] == [[str(c) if isinstance(c, int) else (c or "") for c in neutralise_row(r)] for r in plain]
    run.write_csv_table(str(tmp_path / "empty.csv"), header, table.slice(0, 0))
    assert (tmp_path / "empty.csv").read_text() == "lead_id,role,line_no,amount\n"
