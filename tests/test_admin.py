"""The Admin service and `tracecode load` over real gRPC and Redis: idempotent streamed upserts,
conflicts, replace, recalls (per code and per batch), status changes, reads, and the error paths."""
from __future__ import annotations

import gzip
import json

import grpc
import pytest

from tracecode import cli
from tracecode.clients.files import Row
from tracecode.clients.pos import line
from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, gs1, gtin14, issuance, load
from helpers import event_types, verdicts

P, Q = "8123456", "8999999"


def status_of(admin, code) -> str:
    return pb.CodeStatus.Name(admin.get(code).status)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)
    return err.value


# ------------------------------------------------------------------ UpsertIssuance

def test_loading_the_same_records_twice_changes_nothing(admin):
    gtin = gtin14()
    rows = [issuance(cn20(), P, batch="B1", expiry="2030-01-31", pack_units=10, manufacturer="M"),
            issuance(cn20(), P),
            issuance(gs1(gtin, expiry="301231", batch="L9"), "P-GS1", gtin=gtin)]
    first = load(admin, *rows)
    assert (first.received, first.created, first.unchanged) == (3, 3, 0)
    before = [admin.get(r.fields["code"]) for r in rows]
    again = load(admin, *rows)
    assert (again.received, again.created, again.updated, again.unchanged, again.conflicts) == (3, 0, 0, 3, 0)
    assert [admin.get(r.fields["code"]) for r in rows] == before


def test_changed_fields_of_the_same_product_are_an_update(admin):
    code = cn20()
    load(admin, issuance(code, P, expiry="2030-01-31"))
    resp = load(admin, issuance(code, P, expiry="2031-06-30"))
    assert (resp.updated, resp.created) == (1, 0)
    assert admin.get(code).expiry == "2031-06-30"


def test_a_conflicting_product_is_reported_and_the_stored_record_wins(admin):
    code = cn20()
    load(admin, issuance(code, P, batch="B1"))
    resp = admin.upsert([Row("issuer.csv", 7, {"code": code, "product_id": Q, "batch": "B1"})],
                        source="issuer.csv")
    assert (resp.conflicts, resp.updated, resp.rejected) == (1, 0, 0)
    (err,) = resp.errors
    assert (err.source, err.line, err.code) == ("issuer.csv", 7, code) and "conflict" in err.reason
    assert admin.get(code).product_id == P


def test_replace_overwrites_a_conflicting_record(admin):
    code = cn20()
    load(admin, issuance(code, P))
    resp = load(admin, issuance(code, Q), replace=True)
    assert (resp.updated, resp.conflicts) == (1, 0)
    assert admin.get(code).product_id == Q


def test_a_reload_without_status_keeps_a_recall(admin, pos):
    code = cn20()
    row = issuance(code, P, batch="B1")
    load(admin, row)
    admin.set_status(code, "RECALLED", reason="recall 2024-17")
    assert load(admin, row).unchanged == 1  # the original file again: the recall stays
    assert status_of(admin, code) == "RECALLED"
    assert verdicts(pos.verify("SITE-A", [line(code, P)])) == ["BLOCKED"]
    # A status given in the upload is applied.
    assert load(admin, issuance(code, P, batch="B1", status="ACTIVE")).updated == 1
    assert status_of(admin, code) == "ACTIVE"


@pytest.mark.parametrize("fields, field", [
    ({"gtin": "06999999999994"}, "gtin"),              # another GTIN than the one in the code
    ({"expiry": "2031-01-31"}, "expiry"),              # another date than AI 17 (2030-12-31)
    ({"batch": "OTHER"}, "batch"),                     # another batch than AI 10 (L9)
    ({"expiry": "2025-02-30"}, "expiry"),              # no such date
    ({"expiry": "31.12.2030"}, "expiry"),
    ({"product_id": ""}, "product_id"),
    ({"code": "(01)06901234567890(21)X"}, "code"),     # bad GTIN check digit
])
def test_row_errors_name_the_source_line_and_field(admin, fields, field):
    gtin = gtin14()
    f = {"code": gs1(gtin, expiry="301231", batch="L9"), "product_id": "P-GS1"}
    f.update(fields)
    good = issuance(cn20(), P)
    resp = admin.upsert([Row("f.csv", 4, good.fields), Row("f.csv", 5, f)], source="f.csv")
    assert (resp.received, resp.created, resp.rejected) == (2, 1, 1)
    (err,) = resp.errors
    assert (err.source, err.line) == ("f.csv", 5)
    assert err.reason.startswith(f"{field}:"), err.reason


# ------------------------------------------------------------------ RecallBatch

def test_recall_batch_recalls_every_code_of_the_product_batch(admin, pos):
    batch = [cn20() for _ in range(3)]
    other_batch, other_product = cn20(), cn20()
    load(admin, *(issuance(c, P, batch="B1") for c in batch),
         issuance(other_batch, P, batch="B2"), issuance(other_product, Q, batch="B1"))
    resp = admin.recall(P, "B1", reason="contamination")
    assert (resp.codes_changed, resp.codes_unchanged) == (3, 0)
    for code in batch:
        r = pos.verify("SITE-A", [line(code, P)]).results[0]
        assert pb.Verdict.Name(r.verdict) == "BLOCKED" and pb.CodeStatus.Name(r.code_status) == "RECALLED"
        hist = pos.history(code)
        assert event_types(hist)[0] == "STATUS_CHANGED" and "contamination" in hist.events[0].detail
    assert verdicts(pos.verify("SITE-A", [line(other_batch, P), line(other_product, Q)])) == ["OK", "OK"]
    again = admin.recall(P, "B1")
    assert (again.codes_changed, again.codes_unchanged) == (0, 3)


def test_recall_batch_with_unspecified_status_recalls(admin):
    code = cn20()
    load(admin, issuance(code, P, batch="B5"))
    resp = admin.stub.RecallBatch(apb.RecallBatchRequest(product_id=P, batch="B5"))
    assert resp.codes_changed == 1 and status_of(admin, code) == "RECALLED"


def test_recall_batch_touches_only_codes_whose_record_is_in_the_batch(admin):
    # The batch index may still list a code whose record moved on: a replaced product, a corrected
    # batch, or a conflicting upload that was refused. The recall must follow the stored record.
    replaced, moved, refused = cn20(), cn20(), cn20()
    load(admin, issuance(replaced, P, batch="R1"), issuance(moved, P, batch="R1"),
         issuance(refused, P, batch="R2"))
    load(admin, issuance(replaced, Q, batch="R1"), replace=True)   # now product Q
    load(admin, issuance(moved, P, batch="R3"))                    # batch corrected to R3
    resp = admin.upsert([issuance(refused, Q, batch="R2")])        # conflict: stored P/R2 wins
    assert resp.conflicts == 1

    assert admin.recall(P, "R1").codes_changed == 0
    assert admin.recall(Q, "R2").codes_changed == 0
    assert [status_of(admin, c) for c in (replaced, moved, refused)] == ["ACTIVE"] * 3
    # The stored records' own batches still recall them.
    assert admin.recall(Q, "R1").codes_changed == 1
    assert admin.recall(P, "R3").codes_changed == 1
    assert admin.recall(P, "R2").codes_changed == 1


def test_recall_batch_needs_product_and_batch(admin):
    for product, batch in ((P, ""), ("", "B1")):
        err = rpc_error(admin.recall, product, batch)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ SetCodeStatus

def test_set_code_status_reports_previous_and_logs_only_changes(admin, pos):
    code = cn20()
    load(admin, issuance(code, P))
    resp = admin.set_status(code, "LOCKED", reason="inquiry 9")
    assert resp.canonical_code == code
    assert (pb.CodeStatus.Name(resp.previous), pb.CodeStatus.Name(resp.status)) == ("ACTIVE", "LOCKED")
    same = admin.set_status(code, "LOCKED")
    assert pb.CodeStatus.Name(same.previous) == "LOCKED"
    hist = pos.history(code)
    assert event_types(hist) == ["STATUS_CHANGED"] and hist.events[0].site_id == "admin"
    r = pos.verify("SITE-A", [line(code, P)]).results[0]
    assert pb.CodeStatus.Name(r.code_status) == "LOCKED"


def test_set_code_status_error_paths(admin):
    assert rpc_error(admin.set_status, cn20(), "LOCKED").code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(admin.set_status, "81234", "LOCKED").code() == grpc.StatusCode.INVALID_ARGUMENT
    code = cn20()
    load(admin, issuance(code, P))
    err = rpc_error(admin.stub.SetCodeStatus, apb.SetCodeStatusRequest(raw_code=code))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "status" in err.details()


# ------------------------------------------------------------------ GetIssuance

def test_get_issuance_reads_the_record_in_any_scan_form(admin):
    gtin = gtin14()
    code = gs1(gtin, "SN-77", expiry="301231", batch="L9")
    load(admin, issuance(code, "P-GS1", pack_units=20, manufacturer="Maker"))
    rec = admin.get(f"]d201{gtin}17301231\x1d10L9\x1d21SN-77")
    assert rec.canonical_code == f"01{gtin}21SN-77"
    assert (rec.product_id, rec.gtin, rec.batch, rec.expiry, rec.pack_units, rec.manufacturer) == \
        ("P-GS1", gtin, "L9", "2030-12-31", 20, "Maker")
    assert pb.CodeStatus.Name(rec.status) == "ACTIVE"


def test_get_issuance_error_paths(admin):
    assert rpc_error(admin.get, cn20()).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(admin.get, "not a code").code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ tracecode load

HEADER = "code,product_id,gtin,batch,expiry,pack_units,manufacturer,status\n"


def run_load(target, *paths, replace=False):
    return cli.main(["load", "--server", target, *([] if not replace else ["--replace"]), *map(str, paths)])


def test_load_csv_reports_bad_rows_by_file_line_and_field(tmp_path, target, admin, capsys):
    good1, good2, good3 = cn20(), cn20(), cn20()
    gtin = gtin14()
    path = tmp_path / "issuer.csv"
    path.write_text(HEADER
                    + f"{good1},{P},,B1,2030-01-31,10,M,\n"              # line 2
                    + f"{cn20()},,,B1,,,,\n"                             # line 3: no product_id
                    + f"{good2},{P},,B1,,,,\n"                           # line 4
                    + f"{gs1(gtin)},P-GS1,06999999999994,,,,,\n"         # line 5: GTIN mismatch
                    + f"{cn20()},{P},,,,ten,,\n"                         # line 6: pack_units
                    + f"{cn20()},{P},,,,,,RECALLD\n"                     # line 7: status
                    + f"{good3},{P},,,,,,RECALLED\n")                    # line 8
    assert run_load(target, path) == 1
    out, err = capsys.readouterr()
    assert f"{path}:3: product_id:" in err
    assert f"{path}:5: " in err and "gtin:" in err.split(f"{path}:5: ", 1)[1].splitlines()[0]
    assert f"{path}:6: pack_units:" in err
    assert f"{path}:7: status:" in err
    assert "created=3" in out and "rejected=4" in out
    assert admin.get(good1).pack_units == 10
    assert status_of(admin, good3) == "RECALLED"
    # Reloading the same file changes nothing and reports the same bad rows.
    assert run_load(target, path) == 1
    out, _ = capsys.readouterr()
    assert "created=0" in out and "unchanged=3" in out


def test_load_jsonl_and_gz(tmp_path, target, admin, capsys):
    a, b, c = cn20(), cn20(), cn20()
    jsonl = tmp_path / "issuer.jsonl"
    jsonl.write_text(json.dumps({"code": a, "product_id": P, "pack_units": 5}) + "\n"   # line 1
                     + "\n"                                                             # line 2
                     + "{not json\n"                                                    # line 3
                     + json.dumps({"code": b, "product_id": P, "expiry": "2030-13-01"}) + "\n")  # line 4
    assert run_load(target, jsonl) == 1
    _, err = capsys.readouterr()
    assert f"{jsonl}:3: " in err
    assert f"{jsonl}:4: " in err and "expiry" in err.split(f"{jsonl}:4: ", 1)[1].splitlines()[0]
    assert admin.get(a).pack_units == 5

    gz = tmp_path / "issuer.csv.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(HEADER + f"{c},{P},,B1,,,,\n" + f"{cn20()},{P},,,,0,,\n")  # line 3: pack_units 0
    jgz = tmp_path / "more.jsonl.gz"
    with gzip.open(jgz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"code": b, "product_id": P}) + "\n")
    assert run_load(target, gz, jgz) == 1
    out, err = capsys.readouterr()
    assert f"{gz}:3: pack_units:" in err
    assert "created=2" in out and "rejected=1" in out
    assert "records sent" in err  # progress
    assert admin.get(c).batch == "B1" and admin.get(b).product_id == P
    assert run_load(target, jgz) == 0  # a clean file exits 0
    assert "unchanged=1" in capsys.readouterr()[0]


def test_load_with_replace(tmp_path, target, admin, capsys):
    code = cn20()
    load(admin, issuance(code, P))
    path = tmp_path / "fix.csv"
    path.write_text(HEADER + f"{code},{Q},,,,,,\n")
    run_load(target, path)
    assert "conflicts=1" in capsys.readouterr()[0] and admin.get(code).product_id == P
    assert run_load(target, path, replace=True) == 0
    assert "updated=1" in capsys.readouterr()[0] and admin.get(code).product_id == Q


def test_load_names_a_file_it_cannot_read(tmp_path, target, admin, capsys):
    good = tmp_path / "good.csv"
    code = cn20()
    good.write_text(HEADER + f"{code},{P},,,,,,\n")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"not gzip at all")
    missing = tmp_path / "missing.csv"
    assert run_load(target, missing, broken, good) == 1
    out, err = capsys.readouterr()
    assert f"{missing}:" in err and f"{broken}:" in err and "cannot read" in err
    assert "created=1" in out and "rejected=2" in out
    assert admin.get(code).product_id == P  # the readable file was loaded
