"""The leads engine is REPLAY's columnar twin: over generated histories every line's verdict (and
a duplicate's first dispense) equals what a bulk REPLAY through a real server and Redis gives,
line for line, in REPLAY's order; the rows REPLAY rejects are the rows the engine rejects.

REPLAY here is the real path: `tracecode load`'s client streams the issuance into a real
server, `run_job` (what `tracecode reverify --mode replay` runs) streams the same files.
"""
from __future__ import annotations

import csv
import os
from datetime import datetime

import pytest

from tracecode.clients.admin import AdminClient
from tracecode.clients.files import ISSUANCE_FIELDS, read_rows
from tracecode.clients.reverify import run_job
from tracecode.leads import synth
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file

EDGE_ROWS = [  # rows REPLAY rejects or judges oddly, appended to file 0 (late in time)
    {"site_id": "E1", "settlement_id": "X1", "settled_at": "not a time", "line_no": "1", "code": "8100000000000000001",
     "product_id": "8100000"},
    {"site_id": "E1", "settlement_id": "X2", "settled_at": "2024-06-01T10:00:00", "line_no": "1",  # no offset
     "code": "81000000000000000011", "product_id": "8100000"},
    {"site_id": "E1", "settlement_id": "X3", "settled_at": "2024-06-01T10:00:00+08:00", "line_no": "0",
     "code": "81000000000000000011", "product_id": "8100000"},
    {"site_id": "E1", "settlement_id": "X4", "settled_at": "2024-06-01T10:00:01+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000", "units": "-1"},
    {"site_id": "E 1", "settlement_id": "X5", "settled_at": "2024-06-01T10:00:02+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000"},  # site id outside the alphabet
    {"site_id": "E1", "settlement_id": "X6", "settled_at": "2024-06-01T10:00:03+08:00", "line_no": "1",
     "code": "8" * 600, "product_id": "8100000"},  # longer than max_code_length
    {"site_id": "E1", "settlement_id": "X7", "settled_at": "2024-06-01T10:00:04+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000", "units": "100001"},
    {"site_id": "E1", "settlement_id": "X8", "settled_at": "1969-12-31T10:00:04+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000"},  # before 1970
    {"site_id": "E1", "settlement_id": "X9", "settled_at": "2024-06-01T10:00:05+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": ""},  # a required field missing
    # The shared row rules (rules/rows.py, issue 23): both readers refuse these rows.
    {"site_id": "E1", "settlement_id": "X10", "settled_at": "2024-06-01T10:00:06+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000", "amount": "1e20"},
    {"site_id": "E1", "settlement_id": "X11", "settled_at": "2024-06-01T10:00:07+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000", "insured_id": "A" * 68},
    {"site_id": "E1", "settlement_id": "X12", "settled_at": "2024-06-01T10:00:08+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "8100000", "insured_id": "110101198001010011"},
    {"site_id": "E1", "settlement_id": "X13", "settled_at": "2024-06-01T10:00:09+08:00", "line_no": "1",
     "code": "81000000000000000011", "product_id": "81\u202e00000"},  # a bidi override
]


def _add_edges(h: synth.History) -> None:
    h.files[0].extend(EDGE_ROWS)
    big = [{"site_id": "E2", "settlement_id": "BIG", "settled_at": "2024-06-01T11:00:00+08:00", "line_no": str(i),
            "code": f"8100000{i:013d}", "product_id": "8100000"} for i in range(1, 202)]  # 201 > max_lines
    h.files[0].extend(big)
    # Lines of one settlement out of line_no order: REPLAY sends them sorted.
    h.files[1].extend([
        {"site_id": "E3", "settlement_id": "ORD", "settled_at": "2024-06-01T12:00:00+08:00", "line_no": "2",
         "code": h.issuance[5]["code"], "product_id": h.issuance[5]["product_id"]},
        {"site_id": "E3", "settlement_id": "ORD", "settled_at": "2024-06-01T12:00:00+08:00", "line_no": "1",
         "code": h.issuance[5]["code"], "product_id": h.issuance[5]["product_id"]}])


def _replay_flagged(out: str) -> list[tuple]:
    with open(os.path.join(out, "flagged.csv"), newline="", encoding="utf-8") as fh:
        return [(r["site_id"], r["settlement_id"], str(int(r["line_no"])), r["code"], r["verdict"],
                 r["canonical_code"], r["first_site_id"], r["first_settlement_id"],
                 int(datetime.fromisoformat(r["first_settled_at"]).timestamp()) if r["first_settled_at"] else "")
                for r in csv.DictReader(fh)]


def _engine_lines(out: str) -> list[dict]:
    with open(os.path.join(out, "lines.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _errors(out: str) -> set[tuple]:
    with open(os.path.join(out, "errors.csv"), newline="", encoding="utf-8") as fh:
        return {(r["file"], int(r["line"]), r["field"]) for r in csv.DictReader(fh)}


@pytest.mark.parametrize("seed,n_lines,noise,forms,spark", [
    (21, 3000, 1.0, ("csv", "jsonl.gz"), False),
    # Five times the irregularities; and Spark (local mode) over the same files gives every
    # line's verdict and every error REPLAY's twin gives, byte for byte.
    (22, 1500, 5.0, ("parquet", "csv.gz"), True),
])
def test_every_line_verdict_equals_bulk_replay(tmp_path, target, seed, n_lines, noise, forms, spark):
    h = synth.history(n_lines, seed=seed, noise=noise)
    _add_edges(h)
    iss = synth.write_csv(str(tmp_path / "issuance.csv"), h.issuance, synth.ISSUANCE_COLUMNS)
    # A second upload over the first: recalls and new expiry for some packs (same product:
    # updates), other products for others (conflicts: the first record stays).
    again = []
    for n, rec in enumerate(h.issuance[7::40]):
        change = ({"status": "RECALLED"}, {"expiry": "2020-01-31", "status": ""}, {"product_id": "8999999"},
                  {"pack_units": "3"})[n % 4]
        again.append({**rec, **change})
    iss2 = synth.write_csv(str(tmp_path / "issuance-2.csv"), again, synth.ISSUANCE_COLUMNS)
    files = []
    for fi, form in enumerate(forms):
        path = str(tmp_path / f"export-{fi}.{form}")
        rows = h.files[fi]
        if form.startswith("csv"):
            synth.write_csv(path, rows, synth.SETTLEMENT_COLUMNS)
        elif form.startswith("jsonl"):
            synth.write_jsonl(path, rows)
        else:
            synth.write_parquet(path, rows, synth.SETTLEMENT_COLUMNS)
        files.append(path)

    # REPLAY: issuance through the server (as `tracecode load`), then the bulk job.
    admin = AdminClient(target)
    try:
        for path in (iss, iss2):
            resp = admin.upsert(read_rows(path, ISSUANCE_FIELDS), source=path)
        assert resp.conflicts > 0 and resp.updated > 0
    finally:
        admin.close()
    replay_out = str(tmp_path / "replay")
    summary = run_job(target, files, replay_out, job_id=f"twin-{seed}", mode="replay", chunk_size=97,
                      progress=False)

    key = str(tmp_path / "pseudonym.key")
    generate_key_file(key)
    engine_out = str(tmp_path / "leads")
    run(Options(files=files, issuance=[iss, iss2], out=engine_out, lines_out=True, progress=False,
                pseudonyms=Pseudonyms(Pseudonymizer.from_file(key))))

    lines = _engine_lines(engine_out)
    flagged = [(r["site_id"], r["settlement_id"], r["line_no"], r["code"], r["verdict"], r["canonical_code"],
                r["first_site_id"], r["first_settlement_id"],
                int(datetime.fromisoformat(r["first_settled_at"]).timestamp()) if r["first_settled_at"] else "")
               for r in lines if r["verdict"] != "OK"]
    expected = _replay_flagged(replay_out)
    # The history really exercises the rules (else agreement would prove little).
    verdicts = {f[4] for f in expected}
    assert {"DUPLICATE", "PRODUCT_MISMATCH", "EXPIRED", "UNKNOWN", "MALFORMED", "BLOCKED", "QUANTITY_EXCEEDED",
            "DUPLICATE_IN_REQUEST"} <= verdicts
    assert len(flagged) == len(expected)
    for n, (mine, theirs) in enumerate(zip(flagged, expected)):
        assert mine == theirs, f"flagged line {n} differs"
    assert sum(1 for r in lines if r["verdict"] == "OK") == summary["verdicts"]["OK"]
    assert len(lines) == summary["records"]
    # The rows REPLAY could not use are the rows the engine reports, with the same field (the
    # engine also reports the issuance file's rejections); amounts and insured ids included.
    with open(os.path.join(replay_out, "errors.csv"), newline="", encoding="utf-8") as fh:
        replay_errors = {(r["file"], int(r["line"]), r["field"]) for r in csv.DictReader(fh)}
    mine = {e for e in _errors(engine_out) if e[0] in files}
    assert replay_errors and mine == replay_errors
    assert {"amount", "insured_id", "product_id"} <= {e[2] for e in mine}
    if spark:
        spark_out = str(tmp_path / "leads-spark")
        run(Options(files=files, issuance=[iss, iss2], out=spark_out, lines_out=True, progress=False,
                    engine="spark", spark_master="local[2]", pseudonyms=Pseudonyms(Pseudonymizer.from_file(key))))
        for name in ("lines.csv", "errors.csv", "leads.csv", "evidence.csv"):
            with open(os.path.join(engine_out, name), "rb") as a, open(os.path.join(spark_out, name), "rb") as b:
                assert a.read() == b.read(), name
