"""The split of clients/reverify.py's Report (issue 15) writes the same bytes as the code before
it: one generated data set (test_bulk's planted fraud: resold packs, swaps, a ring, a bad row, two
files overlapping in time) re-verified by both, through the same real server, in both formats."""
from __future__ import annotations

import json
import re

import pytest

from tracecode.clients import reverify

import reverify_before_split
from test_bulk import make_dataset

# The outputs are the client's: what the server answers is the same on both backends.
pytestmark = pytest.mark.backend_independent

OUTPUTS = ("errors.csv", "network.csv", "summary.json")


def _bytes(path) -> bytes:
    data = path.read_bytes()
    # The one field that differs between two runs of one job: its wall time.
    return re.sub(rb'"seconds_this_run": [0-9.e-]+', b'"seconds_this_run": 0', data) if path.name == "summary.json" else data


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_split_report_writes_the_same_bytes_as_before(tmp_path, admin, target, fmt):
    files, _, n_rows = make_dataset(tmp_path, admin, seed=13)
    runs = {}
    for name, module in (("before", reverify_before_split), ("after", reverify)):
        out = tmp_path / name
        # One job id for both (run one after the other; each drops its namespace at the end), so
        # summary.json's job_id matches too. Small chunks and streams: many boundaries crossed.
        summary = module.run_job(target, files, str(out), job_id=f"same-bytes-{fmt}", fmt=fmt,
                                 chunk_size=37, stream_chunks=3, progress=False)
        runs[name] = out
        assert summary["records"] == n_rows and summary["rings"] == [["R1", "R2", "R3"]]
    for name in (f"flagged.{fmt}", *OUTPUTS):
        before, after = _bytes(runs["before"] / name), _bytes(runs["after"] / name)
        assert before == after, name
        assert len(after) > 60, name  # a real report: more than a header
    assert sorted(p.name for p in runs["after"].iterdir()) == sorted((f"flagged.{fmt}", *OUTPUTS))


def test_a_checkpoint_of_the_old_code_resumes_in_the_new(tmp_path):
    """checkpoint.json keeps its layout: the new Checkpoint reads what the old code saved, to the
    same counts and offsets, and saves it back the same."""
    old = reverify_before_split.Report(str(tmp_path), "csv")
    old.records, old.settlements, old.bad_records = 7, 3, 1
    old.verdicts.update({"OK": 5, "DUPLICATE": 2})
    old.per_site["S1"].update({"OK": 5})
    old.per_site["S2"].update({"DUPLICATE": 2})
    old.pairs["S1", "S2"] += 2
    old.errors_writer.writerow(["f.csv", 3, "units", "bad"])
    saved = {"job_id": "j", "files": ["f.csv"], "mode": "replay", "positions": [9], "report": old.state()}
    old.close()
    path = tmp_path / "checkpoint.json"
    path.write_text(json.dumps(saved), encoding="utf-8")
    ckpt = reverify.Checkpoint.load(str(path))
    assert ckpt.tally.records == 7 and ckpt.tally.pairs == {("S1", "S2"): 2}
    assert ckpt.offsets == reverify.Offsets(saved["report"]["offsets"]["flagged"],
                                            saved["report"]["offsets"]["errors"])
    assert ckpt.offsets.errors == len(b"file,line,field,reason\r\nf.csv,3,units,bad\r\n")
    ckpt.save(str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == saved
    assert reverify.DuplicateNetwork(ckpt.tally.pairs).ranked() == [reverify.Pair("S1", "S2", 2)]
