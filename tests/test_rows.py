"""rules/rows.py: the one validation of settlement rows that `tracecode reverify` and the leads
engine share (issue 23, 14): both readers give the same errors (file, line, field, reason) for the
same bad rows, in CSV, JSONL and Parquet; no error text holds the value it refuses; reverify's
writers neutralise formula cells and a missing file stops a job before it writes anything."""
from __future__ import annotations

import csv
import json
import os

import pytest

from tracecode.clients import reverify
from tracecode.clients.files import ByteCounter, InputFileError, Row, RowError, read_rows, SETTLEMENT_READ_FIELDS
from tracecode.leads import synth
from tracecode.leads.inputs import Limits, Pseudonyms, read_settlements
from tracecode.rules import rows
from tracecode.rules.insured import resident_check_char
from tracecode.rules.pseudonym import Pseudonymizer

AT = "2024-05-06T10:15:00+08:00"
GOOD = {"site_id": "S1", "settlement_id": "T1", "settled_at": AT, "line_no": "1", "code": "81234560000000010000",
        "product_id": "8123456", "units": "", "insured_id": "", "amount": ""}
RESIDENT = "11010119800101001" + resident_check_char("11010119800101001")
# (field broken, value, the field reported): one bad row per rule, and the probes' values.
BAD = [
    ("site_id", "S 1", "site_id"), ("site_id", "S" * 65, "site_id"), ("site_id", "S\u202e1", "site_id"),
    ("settlement_id", "T/1", "settlement_id"), ("settled_at", "yesterday", "settled_at"),
    ("settled_at", "2024-05-07T10:15:00", "settled_at"), ("settled_at", "2024-02-30T10:15:00+08:00", "settled_at"),
    ("line_no", "0", "line_no"), ("line_no", "x", "line_no"), ("line_no", "１", "line_no"),
    ("line_no", "99999999999", "line_no"), ("code", "8" * 4097, "code"), ("product_id", "81\x0723456", "product_id"),
    ("product_id", "81\u202e23456", "product_id"), ("product_id", "P" * 65, "product_id"),
    ("units", "-1", "units"), ("units", "1.5", "units"), ("units", "4294967296", "units"),
    ("units", "2147483648", "units"), ("units", "100001", "units"),
    ("insured_id", "A" * 68, "insured_id"),  # the probe: 68 characters, accepted by one reader before
    ("insured_id", RESIDENT[:-1] + ("1" if RESIDENT[-1] != "1" else "2"), "insured_id"),
    ("insured_id", RESIDENT[:-1] + "\u0425", "insured_id"), ("insured_id", "P\x001", "insured_id"),
    ("insured_id", "1 " * 100, "insured_id"),
    ("amount", "1e20", "amount"), ("amount", "Infinity", "amount"), ("amount", "NaN", "amount"),
    ("amount", "12.505", "amount"), ("amount", "-3", "amount"), ("amount", "100000000", "amount"),
    ("amount", RESIDENT, "amount"),  # the columns swapped: an id where the amount goes
]
# Good rows the rules must not refuse: normalisable ids, an absent id, edge values.
GOOD_VARIANTS = [("insured_id", "p-1"), ("insured_id", " １１０１０１１９８００１０１００１" + RESIDENT[-1]),
                 ("insured_id", RESIDENT.lower()), ("insured_id", "  "), ("amount", "0"), ("amount", "99999999.99"),
                 ("amount", "12.5000"), ("units", "0"), ("units", str(rows.MAX_UNITS)), ("line_no", "007"),
                 ("line_no", str(rows.MAX_INT)), ("code", "8" * 600),
                 ("settled_at", "2024-05-06T02:15:00Z"), ("product_id", "阿莫西林胶囊")]


def _rows_of_cases():
    out, expect, good = [], {}, set()
    for n, (field, value, reported) in enumerate(BAD):
        out.append({**GOOD, "settlement_id": f"B{n}", field: value})
        expect[len(out)] = reported
        out.append({**GOOD, "settlement_id": f"G{n}"})
        good.add(len(out))
    for n, (field, value) in enumerate(GOOD_VARIANTS):
        out.append({**GOOD, "settlement_id": f"V{n}", field: value})
        good.add(len(out))
    return out, expect, good


def _reverify_errors(path: str) -> tuple[list[tuple], int]:
    """What a reverify job reads from the file (no server needed): its RowErrors, and rows kept."""
    errors, kept = [], 0
    for s in reverify.settlements_of(path, 0, 0, ByteCounter()):
        errors.extend((e.source, e.line, e.field, e.reason) for e in s.errors)
        kept += len(s.rows)
    return sorted(errors), kept


def _leads_errors(path: str) -> tuple[list[tuple], int]:
    errors: list = []
    ((_, t),) = list(read_settlements([path], Limits(), Pseudonyms(Pseudonymizer(b"k" * 32)), errors))
    return sorted((e.file, e.line, e.field, e.reason) for e in errors), t.num_rows


@pytest.mark.parametrize("form", ["csv", "jsonl.gz", "parquet"])
def test_both_readers_refuse_the_same_rows_with_the_same_errors(tmp_path, form):
    data, expect, good = _rows_of_cases()
    path = str(tmp_path / f"rows.{form}")
    if form == "csv":
        synth.write_csv(path, data, synth.SETTLEMENT_COLUMNS)
    elif form == "parquet":
        synth.write_parquet(path, data, synth.SETTLEMENT_COLUMNS)
    else:
        synth.write_jsonl(path, data)
    first = 2 if form == "csv" else 1  # physical line of the first row
    mine, kept_leads = _leads_errors(path)
    theirs, kept_reverify = _reverify_errors(path)
    assert mine == theirs
    assert {ln - first + 1: f for _, ln, f, _ in mine} == expect
    assert kept_leads == kept_reverify == len(good)
    for _, _, field, reason in mine:
        assert reason and field in rows.FIELD_ORDER
    # No error text repeats the value it refuses (an id in a swapped column stays out of errors.csv).
    text = json.dumps(mine)
    for field, value, _ in BAD:
        if len(value) > 3 and value.strip():
            assert value not in text, (field, value)
    assert RESIDENT not in text


def test_the_rules_limits_are_the_servers():
    """The server takes these limits from the rules core (one definition, not two kept equal)."""
    from tracecode.server import issuance, sanctions, verifier
    assert issuance.MAX_PRODUCT_ID == rows.MAX_PRODUCT_ID and issuance.MAX_PACK_UNITS == rows.MAX_UNITS
    assert verifier.ID_RE is rows.ID_RE is sanctions.ID_RE  # the very pattern object, imported


def test_check_row_reports_the_first_field_in_order():
    bad = {**GOOD, "site_id": "S 1", "amount": "x", "insured_id": "A" * 68}
    problem = rows.check_row(dict(bad))
    assert problem is not None and (problem.field, problem.reason) == ("site_id", rows.ID_REASON)
    fields = {**GOOD, "insured_id": "110101-19800101-001" + RESIDENT[-1].lower(), "amount": "36.50"}
    assert rows.check_row(fields) is None
    assert (fields["_at"], fields["_insured"], fields["_fen"]) == (1714961700000, RESIDENT, 3650)


def test_reverify_reads_every_line_of_a_damaged_file_as_a_row_or_an_error(tmp_path):
    """The reader both share (clients/files.py): bad bytes, an over-long field and an
    unterminated quote each cost their own line only."""
    head = ",".join(synth.SETTLEMENT_COLUMNS)
    lines = [f"S1,T{n},{AT},1,8123456{n:013d},8123456,,,1.00".encode() for n in range(60)]
    lines[10] = lines[10].replace(b"8123456,", b"8123\xff\xfe456,")
    lines[20] = lines[20].replace(b",1.00", b',"1.00')
    lines[30] = lines[30].replace(b"8123456,,", b"8123456," + b"9" * 140_000 + b",")
    path = tmp_path / "damaged.csv"
    path.write_bytes(head.encode() + b"\n" + b"\n".join(lines) + b"\n")
    got = list(read_rows(str(path), SETTLEMENT_READ_FIELDS))
    assert [x.line for x in got] == list(range(2, 62))
    assert [(x.line, x.field) for x in got if isinstance(x, RowError)] == [(12, "product_id"), (22, "row"),
                                                                           (32, "units")]
    assert sum(isinstance(x, Row) for x in got) == 57


def test_reverify_refuses_a_missing_file_before_writing_anything(tmp_path):
    good = synth.write_csv(str(tmp_path / "a.csv"), [GOOD], synth.SETTLEMENT_COLUMNS)
    out = tmp_path / "report"
    with pytest.raises(InputFileError, match="missing.csv: cannot read the file: no such file"):
        reverify.run_job("127.0.0.1:9", [good, str(tmp_path / "missing.csv")], str(out), job_id="j", progress=False)
    assert not out.exists()


def _read_csv(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


EVIL = '=HYPERLINK("http://evil.example/","x")'


def test_reverify_flagged_csv_neutralises_formula_cells_and_jsonl_keeps_data(tmp_path):
    row = {**GOOD, "product_id": EVIL, "code": "+81234560000000010000", "line_no": "2", "verdict": "UNKNOWN",
           "reason": "-not issued", "first_site_id": "@S1"}
    for fmt in ("csv", "jsonl"):
        w = reverify.FlaggedWriter(str(tmp_path), fmt)
        w.write(row)
        w.close()
    header, cells = _read_csv(tmp_path / "flagged.csv")
    got = dict(zip(header, cells))
    assert (got["product_id"], got["code"], got["reason"], got["first_site_id"]) == (
        "'" + EVIL, "'+81234560000000010000", "'-not issued", "'@S1")
    assert (got["site_id"], got["line_no"], got["settled_at"]) == ("S1", "2", AT)  # nothing else changes
    assert json.loads((tmp_path / "flagged.jsonl").read_text(encoding="utf-8"))["product_id"] == EVIL


def test_reverify_errors_and_network_csv_neutralise_formula_cells(tmp_path):
    w = reverify.ErrorWriter(str(tmp_path))
    w.write(RowError("=evil.csv", 3, "@field", "+reason"))
    w.write(RowError("plain.csv", 4, "units", "not an integer 0..100000"))
    w.close()
    assert _read_csv(tmp_path / "errors.csv")[1:] == [["'=evil.csv", "3", "'@field", "'+reason"],
                                                       ["plain.csv", "4", "units", "not an integer 0..100000"]]
    path = str(tmp_path / "network.csv")
    reverify.write_network(path, [reverify.Pair("-S1", "=S2", 3), reverify.Pair("S3", "S4", 1)])
    assert _read_csv(path) == [["first_site_id", "later_site_id", "duplicates"], ["'-S1", "'=S2", "3"],
                               ["S3", "S4", "1"]]
    assert os.path.getsize(path) > 0


def test_resident_check_constants_are_insured_pys():
    import random
    rnd = random.Random(7)
    for _ in range(2000):
        first17 = f"{rnd.randrange(10 ** 17):017d}"
        total = sum(int(d) * w for d, w in zip(first17, rows.RESIDENT_WEIGHTS))
        assert rows.RESIDENT_CHECK[total % 11] == resident_check_char(first17)


def test_the_leads_engines_column_wise_insured_check_equals_the_rule():
    """leads/inputs.py recognises common ids column-wise (the check character in numpy) and
    sends the rest through rows.check_insured_id: the result must be the rule's, id by id."""
    import random

    import pyarrow as pa

    from tracecode.leads.inputs import PROBLEM_MARK, insured_normalised
    rnd = random.Random(11)
    values = ["", "p-1", "P1", "a" * 64, "a" * 65, "1" * 15, "1" * 16, "1" * 20, "1" * 21, RESIDENT, RESIDENT.lower(),
              "０" + RESIDENT[1:], RESIDENT[:17] + "x", "\u200b" + RESIDENT]
    for _ in range(50_000):
        k = rnd.random()
        if k < 0.4:
            first17 = f"{rnd.randrange(10 ** 17):017d}"
            check = resident_check_char(first17)
            values.append(first17 + (check if rnd.random() < 0.7 else rnd.choice("0123456789Xx")))
        elif k < 0.6:
            values.append("".join(rnd.choice("0123456789Xx") for _ in range(rnd.randint(1, 22))))
        elif k < 0.8:
            values.append("".join(rnd.choice("AbZ09 -\u3000１Ｘ\u200b.\u0425") for _ in range(rnd.randint(1, 70))))
        else:
            values.append("".join(rnd.choice("ABCXYZ0123456789") for _ in range(rnd.randint(1, 140))))

    def rule(v):
        try:
            return rows.check_insured_id(v)
        except rows.RowProblem as exc:
            return PROBLEM_MARK + exc.reason
    col = pa.chunked_array([pa.array(values[:20_000]), pa.array(values[20_000:])]).slice(1)
    got = insured_normalised(col).to_pylist()
    assert got == [rule(v) for v in values[1:]]
    assert sum(1 for v in got if v.startswith(PROBLEM_MARK)) > 10_000 and sum(len(v) == 18 for v in got) > 10_000


def _typed_columns():
    import datetime
    import decimal

    import pyarrow as pa
    n = 4
    text = lambda v: pa.array([v] * n)  # noqa: E731
    return n, {
        "timestamp": {"settled_at": pa.array([datetime.datetime(2024, 5, 6, 10, tzinfo=datetime.timezone.utc)] * n),
                      "line_no": pa.array([1, 2, 3, 4])},
        "float": {"line_no": pa.array([1.0, 2.5, None, 4.0]), "amount": pa.array([1.5, float("nan"), float("inf"), 2.25])},
        "list": {"line_no": pa.array([[1], [2], [3], [4]])},
        "struct": {"line_no": pa.array([{"a": 1}] * n)},
        "binary": {"insured_id": pa.array([b"\xff\xfe", b"P1", None, b"x"])},
        "dictionary": {"settled_at": text(AT).dictionary_encode(), "product_id": text("8123456").dictionary_encode()},
        "bool": {"line_no": pa.array([True] * n), "units": pa.array([False] * n)},
        "large_string": {"settled_at": pa.array([AT] * n, pa.large_string())},
        "decimal": {"amount": pa.array([decimal.Decimal("1.50")] * n, pa.decimal128(10, 2))},
    }


@pytest.mark.parametrize("kind", sorted(_typed_columns()[1]))
def test_both_readers_agree_on_parquet_columns_of_any_type(tmp_path, kind):
    """A Parquet export need not hold text: every column is read as str(value) by both readers
    (it crashed the engine for lists, structs and dictionary-encoded strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n, variants = _typed_columns()
    cols = {k: pa.array([v] * n) for k, v in GOOD.items() if k not in ("units", "insured_id", "amount")}
    cols["settlement_id"] = pa.array([f"T{i}" for i in range(n)])
    cols.update(variants[kind])
    path = str(tmp_path / f"{kind}.parquet")
    pq.write_table(pa.table(cols), path)
    mine, kept_leads = _leads_errors(path)
    theirs, kept_reverify = _reverify_errors(path)
    assert mine == theirs and kept_leads == kept_reverify
    assert len(mine) + kept_leads == n
