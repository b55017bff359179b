"""Issue 23, the leads engine's part: damaged input files lose no row (every row is judged or in
errors.csv, never both, never neither, on DuckDB and on Spark), a missing or unreadable input
file stops the run with one line and writes nothing, errors.csv never holds an insured id, and
every CSV the engine writes neutralises formula cells while Parquet keeps the data as it is."""
from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracecode.leads import synth
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.rules.insured import resident_check_char
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file

HEADER = "site_id,settlement_id,settled_at,line_no,code,product_id,units,insured_id,amount"
T0 = datetime(2024, 5, 6, 10, 15, tzinfo=synth.CST)
PZ = Pseudonymizer(b"k" * 32)


def _resident(n: int) -> str:
    first17 = f"3101041985{n % 10000:04d}{n % 1000:03d}"
    return first17 + resident_check_char(first17)


def _cells(tag: str, n: int) -> list[str]:
    """A good row: its own settlement (one line), an unknown code (judged UNKNOWN), a person."""
    return [f"S{n % 7}", f"{tag}{n}", (T0 + timedelta(minutes=n)).isoformat(), "1", f"8123456{n:013d}", "8123456",
            "", _resident(n) if n % 3 else "", f"{n % 50}.50"]


def _line(cells: list[str]) -> str:
    return ",".join(cells)


def _csv_bytes(lines: list[bytes], terminators=(b"\n",)) -> bytes:
    out = [HEADER.encode() + b"\n"]
    for i, line in enumerate(lines):
        out.append(line + terminators[i % len(terminators)])
    return b"".join(out)


# Each builder writes one damaged file and returns (path, the physical lines holding its rows).
def bad_bytes_mid_file(d, gz=False):
    lines = [_line(_cells("B", n)).encode() for n in range(744)]
    lines[372] = lines[372].replace(b"8123456", b"81\xff\xfe23456", 1)  # line 374 of 745
    data = _csv_bytes(lines)
    path = os.path.join(d, "bad-bytes.csv.gz" if gz else "bad-bytes.csv")
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data) if gz else data)
    return path, range(2, 746)


def nul_bytes(d):
    lines = [_line(_cells("N", n)).encode() for n in range(30)]
    lines[3] = lines[3].replace(b",8123456,", b",81\x0023456,")   # in product_id
    lines[6] = lines[6].replace(b",8123456", b",8\x00123456", 1)   # in the code
    cells = _cells("N", 9)
    cells[7] = "\x00" + _resident(9)                                # in the insured id
    lines[9] = _line(cells).encode()
    path = os.path.join(d, "nul.csv")
    open(path, "wb").write(_csv_bytes(lines))
    return path, range(2, 32)


def over_long_field(d):
    lines = [_line(_cells("L", n)) for n in range(49)]
    cells = _cells("L", 5)
    cells[4] = "8" * 140_000
    lines[5] = _line(cells)                                         # row 7 of 50
    path = os.path.join(d, "long.csv")
    open(path, "w", encoding="utf-8").write(HEADER + "\n" + "\n".join(lines) + "\n")
    return path, range(2, 51)


def unterminated_quote(d):
    lines = [_line(_cells("Q", n)) for n in range(40)]
    cells = _cells("Q", 9)
    cells[5] = '"8123456'                                           # opens a quote, never closes it
    lines[9] = _line(cells)
    cells = _cells("Q", 39)
    cells[8] = '"1.50'                                              # the last line too
    lines[39] = _line(cells)
    path = os.path.join(d, "quote.csv")
    open(path, "w", encoding="utf-8").write(HEADER + "\n" + "\n".join(lines))  # no final newline
    return path, range(2, 42)


def wrong_column_count(d):
    lines = [_line(_cells("W", n)) for n in range(30)]
    lines[2] += ",extra,cells"                                      # beyond the header
    lines[4] = ",".join(_cells("W", 4)[:5])                         # a required cell missing
    lines[6] = ",".join(_cells("W", 6)[:6])                         # optional cells missing: a good row
    lines[8] = ",".join(_cells("W", 8)[:2])
    path = os.path.join(d, "columns.csv")
    open(path, "w", encoding="utf-8").write(HEADER + "\n" + "\n".join(lines) + "\n")
    return path, range(2, 32)


def bom(d):
    lines = [_line(_cells("M", n)) for n in range(20)]
    cells = _cells("M", 4)
    cells[7] = "\ufeff" + _resident(4)                              # a BOM in an insured id: normalised away
    lines[4] = _line(cells)
    cells = _cells("M", 8)
    cells[0] = "\ufeffS1"                                           # in a site id: refused
    lines[8] = _line(cells)
    path = os.path.join(d, "bom.csv")
    open(path, "w", encoding="utf-8-sig").write(HEADER + "\n" + "\n".join(lines) + "\n")
    return path, range(2, 22)


def crlf_mix(d):
    lines = [_line(_cells("C", n)).encode() for n in range(30)]
    lines[12] = lines[12].replace(b",1,", b",x,", 1)  # and one bad line_no, after a lone CR
    path = os.path.join(d, "crlf.csv")
    open(path, "wb").write(_csv_bytes(lines, (b"\r\n", b"\n", b"\r\n", b"\r")))
    return path, range(2, 32)


def swapped_columns(d):
    """insured_id and amount swapped: the ids land in the amount column (issue 23, 13)."""
    header = HEADER.replace("insured_id,amount", "amount,insured_id")
    lines = []
    for n in range(26 * 3):
        cells = _cells("X", n)
        if not cells[7]:  # a row without a person has no amount either: it reads well swapped
            cells[8] = ""
        lines.append(_line(cells))
    path = os.path.join(d, "swapped.csv")
    open(path, "w", encoding="utf-8").write(header + "\n" + "\n".join(lines) + "\n")
    return path, range(2, 2 + 26 * 3)


def every_rule(d):
    """One row per row rule of rules/rows.py, each broken once."""
    breaks = [(0, "S 1"), (0, "S" * 65), (1, "T/1"), (2, "yesterday"), (2, "2024-05-06T10:15:00"), (3, "0"),
              (3, "１"), (3, "99999999999"), (5, "81\u202e23456"), (5, "P" * 65), (6, "-1"), (6, "4294967296"),
              (7, "A" * 68), (7, "110101198001010011"), (7, "11010119800101001\u0425"), (8, "1e20"), (8, "Infinity"),
              (8, "12.505"), (8, "100000000")]
    lines = []
    for n, (i, v) in enumerate(breaks):
        cells = _cells("R", n)
        cells[i] = v
        lines.append(_line(cells))
        lines.append(_line(_cells("R", 100 + n)))                  # and a good row after each
    path = os.path.join(d, "rules.csv")
    open(path, "w", encoding="utf-8").write(HEADER + "\n" + "\n".join(lines) + "\n")
    return path, range(2, 2 + len(lines))


def jsonl(d, gz=False):
    names = HEADER.split(",")
    lines = [json.dumps(dict(zip(names, _cells("J", n)))).encode() for n in range(40)]
    lines[3] = lines[3].replace(b'"8123456"', b'"81\xff23456"')     # not UTF-8
    lines[6] = b'{"site_id": "S1", "settlement_id": '               # not JSON
    lines[9] = b'["a", "list"]'                                     # not an object
    lines[15] = lines[15].replace(b'"8123456"', b'"81\\udcff23456"')  # a lone surrogate, escaped
    big = dict(zip(names, _cells("J", 12)))
    big["code"] = "8" * 140_000
    lines[12] = json.dumps(big).encode()
    data = b"\n".join(lines[:20]) + b"\n\n" + b"\n".join(lines[20:]) + b"\n"  # a blank line at 22
    path = os.path.join(d, "rows.jsonl.gz" if gz else "rows.jsonl")
    open(path, "wb").write(gzip.compress(data) if gz else data)
    return path, [n for n in range(1, 42) if n != 21]


def parquet(d):
    names = HEADER.split(",")
    rows = [dict(zip(names, _cells("P", n))) for n in range(40)]
    rows[2]["code"] = None                                          # a required field null
    rows[5]["product_id"] = "P" * 140_000
    rows[8]["insured_id"], rows[8]["amount"] = rows[8]["amount"], rows[8]["insured_id"] or _resident(8)
    rows[11]["line_no"] = "1.5"
    rows[14]["product_id"] = "81\x0723456"
    path = os.path.join(d, "rows.parquet")
    pq.write_table(pa.table({n: pa.array([r[n] for r in rows], pa.string()) for n in names}), path)
    return path, range(1, 41)


MALFORMED = {
    "bad-bytes-mid-file": bad_bytes_mid_file,
    "bad-bytes-gz": lambda d: bad_bytes_mid_file(d, gz=True),
    "nul": nul_bytes,
    "over-long-field": over_long_field,
    "unterminated-quote": unterminated_quote,
    "wrong-column-count": wrong_column_count,
    "bom": bom,
    "crlf-mix": crlf_mix,
    "swapped-insured-amount": swapped_columns,
    "every-row-rule": every_rule,
    "jsonl": jsonl,
    "jsonl-gz": lambda d: jsonl(d, gz=True),
    "parquet": parquet,
}


def _issuance(d) -> str:
    return synth.write_csv(os.path.join(d, "issuance.csv"), [{"code": "81234569999999999999", "product_id": "8123456"}],
                           ["code", "product_id"])


def _run(d, files, engine="duckdb", **kw) -> str:
    out = os.path.join(d, f"out-{engine}")
    run(Options(files=files, issuance=[_issuance(d)], out=out, engine=engine, spark_master="local[1]",
                pseudonyms=Pseudonyms(PZ), lines_out=True, progress=False, **kw))
    return out


def _accounted(out: str, path: str, expected) -> None:
    """input rows = judged rows + rows in errors.csv, for the file: as sets of lines, disjoint."""
    with open(os.path.join(out, "lines.csv"), newline="", encoding="utf-8") as fh:
        judged = [int(r["line"]) for r in csv.DictReader(fh) if r["file"] == path]
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        errors = [(int(r["line"]), r["field"]) for r in csv.DictReader(fh) if r["file"] == path]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    error_lines = {ln for ln, _ in errors}
    assert len(judged) == len(set(judged)) == summary["judged_per_file"][path]
    assert not set(judged) & error_lines, "a row both judged and in errors.csv"
    assert len(error_lines) == len(errors), "a row in errors.csv twice"
    assert sorted(set(judged) | error_lines) == sorted(expected), "rows neither judged nor in errors.csv"
    assert len(judged) + len(errors) == len(expected)
    assert all(f for _, f in errors)  # every error names a field (or `row`)
    assert judged and errors  # the file really has both kinds


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_row_of_a_damaged_file_is_judged_or_reported_duckdb(tmp_path, case):
    path, expected = MALFORMED[case](str(tmp_path))
    out = _run(str(tmp_path), [path])
    _accounted(out, path, expected)


def test_the_probes_rows_are_all_accounted_for(tmp_path):
    """The two probes of the issue: 0xFF 0xFE at line 374 of 745 (one error, 743 judged), a
    140,000-character field on row 7 of 50 (one error, 48 judged)."""
    a, _ = bad_bytes_mid_file(str(tmp_path))
    b, _ = over_long_field(str(tmp_path))
    out = _run(str(tmp_path), [a, b])
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        errors = [(os.path.basename(r["file"]), r["line"], r["field"]) for r in csv.DictReader(fh)]
    assert sorted(errors) == [("bad-bytes.csv", "374", "code"), ("long.csv", "7", "code")]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        assert json.load(fh)["judged_per_file"] == {a: 743, b: 48}


def test_every_row_of_damaged_files_is_judged_or_reported_spark(tmp_path):
    """The same files in one Spark (local mode) run; and the same errors.csv as DuckDB's."""
    d = str(tmp_path)
    built = [MALFORMED[case](d) for case in sorted(MALFORMED)]
    files = [p for p, _ in built]
    spark = _run(d, files, engine="spark")
    for path, expected in built:
        _accounted(spark, path, expected)
    duck = _run(d, files)
    for name in ("errors.csv", "leads.csv", "evidence.csv"):
        with open(os.path.join(duck, name), "rb") as a, open(os.path.join(spark, name), "rb") as b:
            assert a.read() == b.read(), name


# ------------------------------------------------------------------ files that cannot be read

def _cli(d, files, issuance, extra=(), engine="duckdb"):
    out = os.path.join(d, "cli-out")
    if engine == "spark":
        extra = [*extra, "--engine", "spark", "--spark-master", "local[1]"]
    key = os.path.join(d, "cli.key")
    if not os.path.exists(key):
        generate_key_file(key)
    done = subprocess.run([sys.executable, "-m", "tracecode.cli", "leads", *files, "--issuance", *issuance,
                           "--out", out, "--pseudonym-key", key, "--quiet", *extra],
                          capture_output=True, text=True, timeout=300)
    return done, out


def _truncated_gz(d):
    path, _ = bad_bytes_mid_file(d, gz=True)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return path


def _not_parquet(d):
    path = os.path.join(d, "broken.parquet")
    open(path, "wb").write(b"PAR1" + b"\x00" * 100)
    return path


# On Spark only the files found damaged while reading (on an executor) are run again: a missing
# or unreadable one is refused before any engine starts, the same code for both.
@pytest.mark.parametrize("which,engine", [(w, "duckdb") for w in (
    "settlements", "issuance", "sites", "truncated-gz", "not-parquet", "unreadable", "issuance-truncated-gz")]
    + [(w, "spark") for w in ("truncated-gz", "not-parquet", "issuance-truncated-gz")])
def test_a_missing_or_unreadable_input_file_is_an_error_exit_and_nothing_is_written(tmp_path, which, engine):
    d = str(tmp_path)
    good, _ = crlf_mix(d)
    iss = _issuance(d)
    missing = os.path.join(d, "missing.csv")
    files, issuance, extra, named = [good], [iss], [], missing
    if which == "settlements":
        files = [good, missing]
    elif which == "issuance":
        issuance = [iss, missing]
    elif which == "sites":
        extra = ["--sites", missing]
    elif which == "truncated-gz":
        named = _truncated_gz(d)
        files = [good, named]
    elif which == "issuance-truncated-gz":
        named = os.path.join(d, "iss.csv.gz")
        open(named, "wb").write(gzip.compress(open(iss, "rb").read() * 2000)[:300])
        issuance = [named]
    elif which == "not-parquet":
        named = _not_parquet(d)
        files = [good, named]
    else:  # a mode-0 file, or (as root, who reads it anyway) a directory by a file's name
        named = os.path.join(d, "locked.csv")
        open(named, "w").write(HEADER + "\n")
        os.chmod(named, 0)
        if os.access(named, os.R_OK):
            os.remove(named)
            os.mkdir(named)
        files = [good, named]
    done, out = _cli(d, files, issuance, extra, engine)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    if engine == "spark":  # the JVM's own start-up notes come first; the run's is one line, the last
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}: cannot read the file"), done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(out)


# ------------------------------------------------------------------ insured ids and formula cells

def test_errors_csv_never_holds_an_insured_id(tmp_path):
    """Issue 23, 13: the insured_id and amount columns swapped; and every other rule broken."""
    d = str(tmp_path)
    a, _ = swapped_columns(d)
    b, _ = every_rule(d)
    c, _ = parquet(d)
    out = _run(d, [a, b, c])
    data = open(os.path.join(out, "errors.csv"), encoding="utf-8").read()
    ids = {_resident(n) for n in range(200)} | {"A" * 68, "110101198001010011"}
    leaked = [i for i in ids if i in data or i.lower() in data]
    assert not leaked
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        swapped = [r for r in csv.DictReader(fh) if r["file"] == a]
    # 52 rows with an id in the amount column (and an amount in insured_id, the first field of
    # the two checked): each named by field, the value withheld; the 26 rows without either judged.
    assert len(swapped) == 52 and {r["field"] for r in swapped} == {"insured_id"}


def test_every_csv_the_engine_writes_neutralises_formula_cells(tmp_path, monkeypatch):
    """leads.csv (a site's region), evidence.csv (a billed product), errors.csv (a file name),
    lines.csv (a code): each cell a spreadsheet would run starts with an apostrophe; the Parquet
    outputs keep the values as they are."""
    monkeypatch.chdir(tmp_path)
    evil_region = '=HYPERLINK("http://e.vil/","x")'  # within the console's 32 characters
    evil_product = "@SUM(1+1)"
    rows, iss = [], []
    for n, (site, later) in enumerate((("A1", "B1"), ("A2", "B1"))):
        code = f"8123456{n:013d}"
        iss.append({"code": code, "product_id": evil_product})
        for k, s in enumerate((site, later)):
            rows.append({"site_id": s, "settlement_id": f"T{n}{k}", "settled_at": (T0 + timedelta(days=k, minutes=n))
                         .isoformat(), "line_no": "1", "code": code, "product_id": evil_product, "amount": "3.00"})
    rows.append({"site_id": "A1", "settlement_id": "T99", "settled_at": (T0 + timedelta(days=5)).isoformat(),
                 "line_no": "1", "code": "+8123456", "product_id": "8123456"})
    rows.append({"site_id": "A1", "settlement_id": "T98", "settled_at": (T0 + timedelta(days=6)).isoformat(),
                 "line_no": "x", "code": "8123456", "product_id": "8123456"})
    settlements = synth.write_csv("=cmd.csv", rows, synth.SETTLEMENT_COLUMNS)
    issuance = synth.write_csv("issuance.csv", iss, ["code", "product_id"])
    sites = synth.write_csv("sites.csv", [{"site_id": "B1", "site_kind": "PHARMACY", "region": evil_region,
                                           "name": "b"}], ["site_id", "site_kind", "region", "name"])
    run(Options(files=[settlements], issuance=[issuance], sites=sites, out="out", pseudonyms=Pseudonyms(PZ),
                lines_out=True, progress=False))

    def cells(name):
        with open(os.path.join("out", name), newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    lead = next(r for r in cells("leads.csv") if r["subject_id"] == "B1")
    assert lead["region"] == "'" + evil_region and lead["packs"] == "2"
    assert {r["product_id"] for r in cells("evidence.csv")} == {"'" + evil_product}
    assert {(r["file"], r["line"], r["field"]) for r in cells("errors.csv")} == {("'=cmd.csv", "7", "line_no")}
    assert "'+8123456" in {r["code"] for r in cells("lines.csv")}
    assert {r["file"] for r in cells("lines.csv")} == {"'=cmd.csv"}
    # Parquet is data, not a spreadsheet: values unchanged.
    assert evil_region in pq.read_table("out/leads.parquet")["region"].to_pylist()
    assert set(pq.read_table("out/evidence.parquet")["product_id"].to_pylist()) == {evil_product}
    # Nothing else changes: no cell of leads.csv other than the region starts with an apostrophe.
    with open("out/leads.csv", newline="", encoding="utf-8") as fh:
        marked = [c for r in csv.reader(fh) for c in r if c.startswith("'")]
    assert marked == ["'" + evil_region]


def test_a_site_registrys_bad_region_is_reported_and_left_unknown(tmp_path):
    """Region and name are free text (rules/text.py) within the console's columns; a bad one is
    an error row naming the field, never the value, and the site's region is unknown."""
    d = str(tmp_path)
    path, _ = crlf_mix(d)
    sites = synth.write_csv(os.path.join(d, "sites.csv"), [
        {"site_id": "S1", "site_kind": "PHARMACY", "region": "R1\u202eX", "name": "ok"},
        {"site_id": "S2", "site_kind": "PHARMACY", "region": "R" * 33, "name": "n\x00"},
        {"site_id": "S3", "site_kind": "PHARMACY", "region": "=R3", "name": "药店"}], ["site_id", "site_kind", "region", "name"])
    out = _run(d, [path], sites=sites)
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        got = sorted((r["line"], r["field"], r["reason"]) for r in csv.DictReader(fh) if r["file"] == sites)
    assert got == [("2", "region", "format character U+202E at position 3; region unknown"),
                   ("3", "name", "control character U+0000 at position 2; name unknown"),
                   ("3", "region", "33 characters, at most 32; region unknown")]


def test_an_output_directory_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path):
    d = str(tmp_path)
    good, _ = crlf_mix(d)
    blocker = os.path.join(d, "cli-out")
    open(blocker, "w").write("a file where the output directory should be")
    done, _ = _cli(d, [good], [_issuance(d)])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
