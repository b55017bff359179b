"""The leads engine's readers against the functions they stand in for: the bulk client's
settled_at parser, `tracecode load`'s row checks and the server's issuance validation; every
unusable row reported with file, line and field; the CLI end to end."""
from __future__ import annotations

import csv
import gzip
import os
import random
import subprocess
import sys

import pyarrow as pa
import pytest

from tracecode.clients.files import InputFileError
from tracecode.clients.reverify import parse_time
from tracecode.leads import inputs, synth
from tracecode.leads.canon import profile_of
from tracecode.leads.inputs import Limits, Pseudonyms, load_check, read_issuance, read_settlements, settled_ms
from tracecode.server.config import Config
from tracecode.rules.pseudonym import generate_key_file


def test_settled_at_column_wise_equals_the_bulk_clients_parser():
    rnd = random.Random(5)
    values = ["2024-05-06T10:15:00+08:00", "2024-02-30T10:15:00+08:00", "2023-02-29T00:00:00+08:00",
              "2024-05-06T24:00:00+08:00", "2024-05-06 10:15:00+08:00", "2024-05-06T10:15:00Z", "bad", "",
              "2024-05-06T10:15:00.123+08:00", "2024-05-06T10:15:00+24:00", "２024-05-06T10:15:00+08:00",
              "2024-05-06T10:15:00", "0001-01-01T00:00:00+00:00"]
    for _ in range(100_000):
        values.append(f"{rnd.randint(1, 9999):04d}-{rnd.randint(0, 13):02d}-{rnd.randint(0, 32):02d}T"
                      f"{rnd.randint(0, 24):02d}:{rnd.randint(0, 60):02d}:{rnd.randint(0, 60):02d}"
                      f"{rnd.choice('+-')}{rnd.randint(0, 24):02d}:{rnd.choice((0, 30, 45, 59, 60)):02d}")

    def reference(v):
        try:
            return str(parse_time(v))
        except (ValueError, OverflowError) as exc:
            return str(exc)
    assert settled_ms(pa.array(values)).to_pylist() == [reference(v) for v in values]


ISSUANCE = [  # rows of every kind `tracecode load` accepts or rejects
    {"code": "81234560000000010000", "product_id": "8123456"},
    {"code": "81234560000000020000", "product_id": "8123456", "pack_units": "10", "expiry": "2026-02-28"},
    {"code": "81234560000000030000", "product_id": "8123456", "pack_units": "0"},
    {"code": "81234560000000040000", "product_id": "8123456", "pack_units": "100001"},
    {"code": "81234560000000050000", "product_id": "8123456", "status": "recalled"},
    {"code": "81234560000000060000", "product_id": "8123456", "status": "GONE"},
    {"code": "81234560000000070000", "product_id": "8123456", "expiry": "2025-02-30"},
    {"code": "81234560000000080000", "product_id": "8123456", "expiry": "20250101"},
    {"code": "8123456000000009000", "product_id": "8123456"},  # 19 digits
    {"code": "81234560000000100000", "product_id": "8123456", "gtin": "123"},
    {"code": "81234560000000110000", "product_id": "8123456", "gtin": "12a"},
    {"code": "]d2010690123456789217261231102B1\x1d21SN1", "product_id": "G1"},
    {"code": "(01)06901234567892(17)261231(21)SN2", "product_id": "G1", "expiry": "2026-12-30"},
    {"code": "(01)06901234567892(17)261231(21)SN3", "product_id": "G1", "expiry": "2026-12-31"},
    {"code": "(01)06901234567892(10)B7(21)SN4", "product_id": "G1", "batch": "B8"},
    {"code": "(01)06901234567892(10)B7(21)SN5", "product_id": "G1", "batch": "B7", "gtin": "6901234567892"},
    {"code": "(01)06901234567892(21)SN6", "product_id": "G1", "gtin": "06901234567893"},
    {"code": "https://d.example/01/06901234567892/21/SN7", "product_id": "G1", "pack_units": "4"},
    {"code": "81234560000000120000", "product_id": "8123\x07456"},  # a control character
    {"code": "81234560000000130000", "product_id": "8123456", "batch": "B" * 65},
]


def test_issuance_rows_are_accepted_and_stored_as_tracecode_load_stores_them(tmp_path):
    path = synth.write_csv(str(tmp_path / "iss.csv"), ISSUANCE,
                           ["code", "product_id", "gtin", "batch", "expiry", "pack_units", "status"])
    profile = profile_of(Config())
    errors = []
    got = read_issuance([path], profile, errors)
    accepted = {}
    rejected = set()
    for n, row in enumerate(ISSUANCE):
        fields = {k: row.get(k, "") for k in ("code", "product_id", "gtin", "batch", "expiry", "pack_units",
                                              "status")}
        try:  # the functions `tracecode load` runs, row by row
            key, product, _g, _b, exp, units, _m, status = load_check(fields, profile)
            accepted[n + 2] = (key, product, units, exp, status)
        except ValueError:
            rejected.add(n + 2)
    mine = {line: (k, p, u, e, s) for line, k, p, u, e, s in zip(
        got["line"].to_pylist(), got["ckey"].to_pylist(), got["product_id"].to_pylist(),
        got["pack_units"].to_pylist(), got["expiry"].to_pylist(), got["status"].to_pylist())}
    assert mine == accepted
    assert {e.line for e in errors} == rejected and len(rejected) >= 9
    assert all(e.file == path and e.field != "-" for e in errors)


def test_unusable_settlement_rows_are_reported_with_file_line_and_field(tmp_path):
    rows = [{"site_id": "S1", "settlement_id": "A", "settled_at": "2024-05-06T10:15:00+08:00", "line_no": "1",
             "code": " 81234560000000010000\t", "product_id": "8123456", "amount": "12.5"},
            {"site_id": "S1", "settlement_id": "A", "settled_at": "2024-05-06T10:15:00+08:00", "line_no": "x",
             "code": "81234560000000010000", "product_id": "8123456"},
            {"site_id": "S1", "settlement_id": "B", "settled_at": "yesterday", "line_no": "1",
             "code": "81234560000000010000", "product_id": "8123456"},
            {"site_id": "S1", "settlement_id": "C", "settled_at": "2024-05-06T10:16:00+08:00", "line_no": "1",
             "code": "", "product_id": "8123456"},
            {"site_id": "S1", "settlement_id": "D", "settled_at": "2024-05-06T10:17:00+08:00", "line_no": "1",
             "code": "81234560000000010000", "product_id": "8123456", "amount": "lots"}]
    csv_path = synth.write_csv(str(tmp_path / "a.csv.gz"), rows, synth.SETTLEMENT_COLUMNS)
    pq_path = synth.write_parquet(str(tmp_path / "a.parquet"), rows, synth.SETTLEMENT_COLUMNS)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(b"site_id,settlement_id\n")[:-6])
    for path, first in ((csv_path, 2), (pq_path, 1)):
        errors = []
        ((_, t),) = list(read_settlements([path], Limits(), Pseudonyms(), errors))
        assert sorted((e.line, e.field) for e in errors) == [(first + 1, "line_no"), (first + 2, "settled_at"),
                                                             (first + 3, "code"), (first + 4, "amount")]
        assert {e.file for e in errors} == {path}
        assert t["code"].to_pylist() == ["81234560000000010000"]  # stripped as files.py strips
        # An unreadable amount refuses its row, as tracecode reverify refuses it (rules/rows.py):
        # a row is judged or in errors.csv, never both.
        assert t["amount_fen"].to_pylist() == [1250]
        assert not any("lots" in e.reason for e in errors)  # the value is not repeated
    # A file that cannot be read to its end stops the run: its rows cannot be accounted for.
    with pytest.raises(InputFileError, match="broken.csv.gz: cannot read the file"):
        list(read_settlements([str(broken)], Limits(), Pseudonyms(), errors))


def test_cli_writes_the_outputs_and_refuses_a_readable_key(tmp_path):
    h = synth.history(600, seed=4)
    iss = synth.write_csv(str(tmp_path / "iss.csv"), h.issuance, synth.ISSUANCE_COLUMNS)
    exports = [synth.write_csv(str(tmp_path / f"e{i}.csv"), h.files[i], synth.SETTLEMENT_COLUMNS) for i in (0, 1)]
    key = generate_key_file(str(tmp_path / "key"))
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "tracecode.cli", "leads", *exports, "--issuance", iss, "--out", str(out)]
    done = subprocess.run(cli + ["--pseudonym-key", key, "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "lines" in done.stdout and "leads" in done.stdout
    for name in ("leads.csv", "leads.parquet", "evidence.csv", "evidence.parquet", "errors.csv", "network.png",
                 "summary.json"):
        assert (out / name).exists(), name
    with open(out / "errors.csv", newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh))[0] == ["file", "line", "field", "reason"]
    os.chmod(key, 0o644)
    bad = subprocess.run(cli + ["--pseudonym-key", key], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "readable by group or others" in bad.stderr


def test_the_read_stage_on_spark_executors_stages_what_the_worker_processes_stage(tmp_path):
    """Issue 26, deliverable 1: Spark reads, checks, pseudonymises and canonicalises every file on
    its executors (staging.spark_stage, local mode here; tests/test_leads_standalone.py runs it on
    a cluster). Over CSV (.gz), JSONL and Parquet files with bad rows, insured ids and an issuance
    file with rejections it stages the very tables the DuckDB path's worker processes stage, with
    the same errors (file, line, field, reason); a file that cannot be read is the same error."""
    import pyarrow.parquet as pq

    from tracecode.leads.engines import SparkEngine
    from tracecode.leads.staging import spark_stage, stage_all
    from tracecode.rules.pseudonym import Pseudonymizer

    h = synth.history(800, seed=9, noise=3.0)
    ids = ["110101198001010011", "11010119800101001X", "ABC123", "bad id!", ""]
    rows = [{**r, "insured_id": ids[n % len(ids)]} for n, r in enumerate(h.files[0] + h.files[1])]
    rows[5]["line_no"] = "x"
    rows[9]["settled_at"] = "yesterday"
    rows[12]["amount"] = "lots"
    cols = synth.SETTLEMENT_COLUMNS
    third = len(rows) // 3
    files = [synth.write_csv(str(tmp_path / "a.csv.gz"), rows[:third], cols),
             synth.write_jsonl(str(tmp_path / "b.jsonl"), rows[third:2 * third]),
             synth.write_parquet(str(tmp_path / "c.parquet"), rows[2 * third:], cols)]
    iss = [synth.write_csv(str(tmp_path / "iss.csv"), h.issuance, synth.ISSUANCE_COLUMNS),
           synth.write_csv(str(tmp_path / "iss2.csv"), ISSUANCE,
                           ["code", "product_id", "gtin", "batch", "expiry", "pack_units", "status"])]
    pz = Pseudonyms(Pseudonymizer(os.urandom(32)))
    profile = profile_of(Config())
    os.makedirs(tmp_path / "duck")
    os.makedirs(tmp_path / "spark")
    duck = stage_all(files, iss, str(tmp_path / "duck"), Limits(), pz, profile)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(b"site_id,settlement_id\n" * 50)[:-6])
    engine = SparkEngine(str(tmp_path / "spark"), "local[1]")
    try:
        spark = spark_stage(engine.spark, files, iss, str(tmp_path / "spark"), Limits(), pz, profile)
        with pytest.raises(InputFileError, match="broken.csv.gz: cannot read the file"):
            spark_stage(engine.spark, [files[0], str(broken)], [], str(tmp_path / "spark"), Limits(), pz, profile)
    finally:
        engine.close()
    key = lambda e: (e.file, e.line, e.field, e.reason)  # noqa: E731
    n_errors = 0
    for a, b in zip(duck[0] + duck[1], spark[0] + spark[1], strict=True):
        assert a.rows == b.rows and a.rows > 0
        assert pq.read_table(a.path).equals(pq.read_table(b.path)), a.path
        assert sorted(a.errors, key=key) == sorted(b.errors, key=key)
        n_errors += len(a.errors)
    assert n_errors >= 3 + 9  # the rows broken above, the issuance rejections
    people = set(pq.read_table(spark[0][0].path)["insured"].to_pylist()) - {""}
    assert people and all(Pseudonymizer.looks_like_pseudonym(p) for p in people)


def test_the_strip_set_is_every_whitespace_character_python_knows():
    # inputs.py scans only the code points below PY_SPACE_BOUND (start-up time): no whitespace
    # character of the running Python's Unicode lies above it.
    assert inputs.PY_SPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    assert all(not chr(c).isspace() for c in range(inputs.PY_SPACE_BOUND, 0x110000))
