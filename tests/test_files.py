"""CSV reading: well-formed rows (the fast path) and every other kind of row read as documented."""
from __future__ import annotations

import logging

from tracecode.clients.files import SETTLEMENT_FIELDS, Row, read_rows

AT = "2024-05-06T10:15:00+08:00"
ORDER = ["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units", "insured_id"]


def _read(tmp_path, lines: list[str]):
    f = tmp_path / "export.csv"
    f.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(f), [(x.line, x.fields) if isinstance(x, Row) else (x.line, x.field, x.reason)
                    for x in read_rows(str(f), SETTLEMENT_FIELDS)]


def test_csv_rows(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tracecode.files")
    path, got = _read(tmp_path, [
        ",".join(ORDER + ["pharmacist"]),
        f" S1 ,T1,{AT},1,A,P1,,h1,x",      # cells are stripped
        f"S1,T1,{AT},2,C,P1,2,h1,x",
        "",                                # blank line: skipped
        f"S1,T2,{AT},1,E,P1",              # short row: missing optional cells are empty
        f"S1,T3,{AT},1,F,P1,,h,x,extra",
        f"S1,T4,{AT},1,H, ,,h,x",          # required cell blank
        f"S1,T5,{AT},1,J",                 # short row missing a required cell
    ])
    row = lambda *v: dict(zip(ORDER, v))
    assert got == [
        (2, row("S1", "T1", AT, "1", "A", "P1", "", "h1")),
        (3, row("S1", "T1", AT, "2", "C", "P1", "2", "h1")),
        (5, row("S1", "T2", AT, "1", "E", "P1", "", "")),
        (6, "row", "1 cell(s) beyond the header"),
        (7, "product_id", "required field is missing or empty"),
        (8, "product_id", "required field is missing or empty"),
    ]
    # Fields in header order: the JSONL report writes them in this order.
    assert [list(g[1]) for g in got[:3]] == [ORDER] * 3
    assert [r.getMessage() for r in caplog.records] == [f"{path}: ignoring unknown field(s) pharmacist"]


def test_csv_repeated_column_keeps_its_last_cell(tmp_path):
    _, got = _read(tmp_path, [
        "site_id,settlement_id,settled_at,line_no,code,product_id,code",
        f"S1,T1,{AT},1,A,P1,B",
        f"S1,T1,{AT},2,C,P1,D",
        f"S1,T1,{AT},3,E,P1",              # the repeated column's last cell is missing
    ])
    first = ["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id"]
    assert got == [(2, dict(zip(first, ["S1", "T1", AT, "1", "B", "P1"]))),
                   (3, dict(zip(first, ["S1", "T1", AT, "2", "D", "P1"]))),
                   (4, "code", "required field is missing or empty")]
    assert list(got[1][1]) == first


def test_a_file_without_a_header_row_logs_no_value_of_its_first_row(tmp_path, caplog):
    """Its first row is taken for the header: every other row is an error naming a required
    field, and the warning about unknown columns names none of the first row's values (one is
    an insured id)."""
    caplog.set_level(logging.WARNING, logger="tracecode.files")
    person = "110101198001010010"
    path, got = _read(tmp_path, [f"S1,T1,{AT},1,A,P1,,{person}", f"S1,T2,{AT},1,B,P1,,{person}", "x,y,pharmacist"])
    assert [g[1] for g in got] == ["site_id", "site_id"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert person not in messages and "S1" not in messages and "8 not shaped like a column name (not shown)" in messages


def test_a_header_with_an_unterminated_quote_makes_the_file_unreadable(tmp_path):
    import pytest

    from tracecode.clients.files import InputFileError
    f = tmp_path / "export.csv"
    f.write_text('site_id,"settlement_id,settled_at\nS1,T1,' + AT + "\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="header row has an unterminated quote"):
        list(read_rows(str(f), SETTLEMENT_FIELDS))
