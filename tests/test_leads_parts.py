"""One large Parquet file read in parts, on every core (leads/staging.py): the run is the very run
of the whole file, every line's verdict, leads, evidence and errors byte-identical, with bad rows
in the file, row groups or not, and a settlement that a part boundary cuts (the file is then
staged whole again). The pseudonyms a worker remembers across files are pseudonym_many's own.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracecode.leads import inputs, staging, synth
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.rules.pseudonym import Pseudonymizer

OUTPUTS = ("leads.csv", "evidence.csv", "errors.csv", "lines.csv")


def _files(tmp_path) -> tuple[list[str], list[str], str]:
    h = synth.history(4000, seed=21, noise=3.0)
    rows = [list(h.files[0]), list(h.files[1])]
    # Bad rows, some of them where a part may start: a missing field, an unreadable line_no,
    # a bad time; each row is reported and the rest judged, whatever the parts.
    for fi, n in ((0, 7), (0, 400), (0, 401), (1, 3), (1, 650)):
        rows[fi][n] = {**rows[fi][n], "line_no": "x"}
    rows[0][900] = {**rows[0][900], "site_id": ""}
    rows[1][1200] = {**rows[1][1200], "settled_at": "yesterday"}
    cols = synth.SETTLEMENT_COLUMNS
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    pq.write_table(pa.table({c: pa.array([r.get(c, "") for r in rows[0]], pa.string()) for c in cols}), files[0])
    # The second file in row groups of 150 rows: its parts start at row-group ends.
    pq.write_table(pa.table({c: pa.array([r.get(c, "") for r in rows[1]], pa.string()) for c in cols}), files[1],
                   row_group_size=150)
    # Issuance as Parquet too (read in parts beside the settlements), with records that
    # `tracecode load` rejects and a code issued twice (the merge goes by load order).
    records = list(h.issuance)
    records[10] = {**records[10], "pack_units": "0"}
    records[500] = {**records[500], "status": "GONE"}
    records.append({**records[20], "status": "RECALLED"})
    iss = [synth.write_parquet(str(tmp_path / "iss.parquet"), records, synth.ISSUANCE_COLUMNS)]
    sites = synth.write_csv(str(tmp_path / "sites.csv"), h.sites, ["site_id", "site_kind", "region", "name"])
    return files, iss, sites


def _run(files, iss, sites, out, work) -> dict[str, bytes]:
    os.makedirs(work, exist_ok=True)
    run(Options(files=files, issuance=iss, out=out, sites=sites, lines_out=True, progress=False, workdir=work,
                pseudonyms=Pseudonyms(Pseudonymizer(b"k" * 32))))
    return {f: open(os.path.join(out, f), "rb").read() for f in OUTPUTS}


def _staged(work) -> list[str]:
    return sorted(f for f in os.listdir(work) if f.startswith("lines-"))


def test_a_file_read_in_parts_gives_the_whole_files_run(tmp_path, monkeypatch):
    files, iss, sites = _files(tmp_path)
    whole = _run(files, iss, sites, str(tmp_path / "whole"), str(tmp_path / "w1"))
    assert _staged(tmp_path / "w1") == ["lines-00000.parquet", "lines-00001.parquet"]

    # As on a machine with more cores than files: each file in parts.
    monkeypatch.setattr(staging.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(staging, "PART_MIN_ROWS", 100)
    parts = _run(files, iss, sites, str(tmp_path / "parts"), str(tmp_path / "w2"))
    staged = _staged(tmp_path / "w2")
    assert len([f for f in staged if f.startswith("lines-00000-")]) >= 3, staged
    assert len([f for f in staged if f.startswith("lines-00001-")]) >= 3, staged
    assert len([f for f in os.listdir(tmp_path / "w2") if f.startswith("issuance-00000-")]) >= 3
    for f in OUTPUTS:
        assert parts[f] == whole[f], f
    assert whole["errors.csv"].count(b"\n") >= 10 and b"yesterday" not in whole["errors.csv"]
    assert b"iss.parquet,11," in whole["errors.csv"] and b"iss.parquet,501," in whole["errors.csv"]


def test_a_settlement_cut_by_a_part_boundary_stages_the_file_whole(tmp_path, monkeypatch):
    files, iss, sites = _files(tmp_path)
    whole = _run(files, iss, sites, str(tmp_path / "whole"), str(tmp_path / "w1"))
    first = pq.read_table(files[0])
    ids = first["settlement_id"].to_pylist()
    cut = next(i for i in range(1, len(ids)) if ids[i] == ids[i - 1])  # inside a settlement of two lines
    monkeypatch.setattr(staging.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(staging, "_parts", lambda path, n, settlements=True:
                        [(0, cut), (cut, len(ids))] if path == files[0] else [None])
    cut_run = _run(files, iss, sites, str(tmp_path / "cut"), str(tmp_path / "w2"))
    assert _staged(tmp_path / "w2") == ["lines-00000.parquet", "lines-00001.parquet"]
    for f in OUTPUTS:
        assert cut_run[f] == whole[f], f


def test_parts_start_where_the_settlement_changes(tmp_path, monkeypatch):
    files, _, _ = _files(tmp_path)
    monkeypatch.setattr(staging, "PART_MIN_ROWS", 100)
    for path in files:
        t = pq.read_table(path)
        key = list(zip(t["site_id"].to_pylist(), t["settlement_id"].to_pylist()))
        parts = staging._parts(path, 4)
        assert parts[0][0] == 0 and parts[-1][1] == t.num_rows and len(parts) == 4
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert all(key[a] != key[a - 1] for a, _ in parts[1:])
    assert staging._parts(files[0], 1) == [None]
    assert staging._parts(str(tmp_path / "sites.csv"), 4) == [None]


def test_remembered_pseudonyms_are_pseudonym_manys(monkeypatch):
    pz = Pseudonymizer(os.urandom(32), "k7")
    monkeypatch.setattr(inputs, "_KNOWN", {})
    a = [f"ID{n:05d}" for n in range(3000)]
    b = [f"ID{n:05d}" for n in range(2000, 6000)]
    assert inputs.pseudonyms_of(pz, pa.array(a)).to_pylist() == pz.pseudonym_many(a)
    assert inputs.pseudonyms_of(pz, pa.array(b)).to_pylist() == pz.pseudonym_many(b)
    # Another key never gets the first key's answers.
    other = Pseudonymizer(os.urandom(32), "k7")
    assert inputs.pseudonyms_of(other, pa.array(b)).to_pylist() == other.pseudonym_many(b)
    # Past KNOWN_MAX nothing more is kept, and the answers stay the same.
    monkeypatch.setattr(inputs, "KNOWN_MAX", 6000)
    c = [f"ID{n:05d}" for n in range(5000, 9000)]
    assert inputs.pseudonyms_of(pz, pa.array(c)).to_pylist() == pz.pseudonym_many(c)
    assert len(inputs._KNOWN[f"k7:{pz.fingerprint()}"][0]) == 6000



def test_only_parquet_is_read_in_parts():
    with pytest.raises(ValueError, match="only a Parquet file"):
        inputs.read_table(__file__, inputs.LEADS_FIELDS, [], (0, 10))
