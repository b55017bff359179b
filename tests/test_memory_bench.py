"""benchmarks/memory.py runs end to end at a small size: every layout of this checkout is
measured, every dispensed line came back OK, and the results file has the figures
docs/scaling.md quotes. Structure only: sizes and speeds are the benchmark's business."""
from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "memory.py")
sys.path.insert(0, os.path.dirname(BENCH))

import memory  # noqa: E402


def test_memory_benchmark_runs_every_layout(tmp_path):
    out = tmp_path / "memory.json"
    codes = 400
    subprocess.run([sys.executable, BENCH, "--codes", str(codes), "--batch-size", "50", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    doc = json.loads(out.read_text())
    layouts = memory.layouts_available()
    assert sorted(doc["layouts"]) == [str(n) for n in layouts]
    assert doc["codes"] == codes
    for name, run in doc["layouts"].items():
        assert run["layout"] == int(name)
        assert run["bytes_per_issued_code"] > 0
        five, one = run["dispense_5_lines"], run["dispense_1_line"]
        # Every code dispensed exactly once, all OK: half in 5-line settlements, half in 1-line.
        assert five["codes"] + one["codes"] == codes
        assert five["verdicts"] == {"OK": five["codes"]} and one["verdicts"] == {"OK": one["codes"]}
        assert five["settlements"] == codes // 2 // 5 and one["settlements"] == codes - codes // 2
        for phase in (five, one):
            assert phase["commandstats"]["evalsha"]["calls"] == phase["settlements"]
            assert phase["redis_script_usec_per_code"] > 0
        assert run["dbsize"] > 0
        for code_kind in ("cn20", "gs1"):
            assert run["sample_keys"][code_kind], "the sampled code has keys"
        assert all(f["type"] != "none" for f in run["sample_keys"]["settlement_1_line"].values())
    assert set(doc["summary"]) == set(doc["layouts"])
    for figures in doc["summary"].values():
        # With the audit stream archived a dispensed code keeps its state and record share only.
        for size in ("5_lines", "1_line"):
            assert 0 < figures[f"bytes_per_dispensed_code_{size}_archived"] < figures[f"bytes_per_dispensed_code_{size}"]
    # The national sizing from the public volume, and how it moves with shelf life and dispense rate.
    nat = doc["national"]
    assert nat["assumptions"]["dispensed_per_day"] == 3e8 and nat["assumptions"]["live_codes"] == 3e8 * 365 * 2
    grid = nat["masters_by_shelf_life_and_dispense_rate"]
    assert list(grid) == ["1.0y", "2.0y", "3.0y"]
    for row in grid.values():
        assert list(row.values()) == sorted(row.values()) and row["1e+08/day"] < row["5e+08/day"]
    assert grid["1.0y"]["3e+08/day"] < grid["3.0y"]["3e+08/day"]
    # --renational recomputes that section from the figures alone.
    del doc["national"]
    out.write_text(json.dumps(doc))
    subprocess.run([sys.executable, BENCH, "--renational", "--out", str(out)], check=True, capture_output=True,
                   text=True, timeout=60)
    assert json.loads(out.read_text())["national"] == nat


def test_code_buckets_keep_each_hash_near_the_target():
    # 1M codes over 1,024 hash tags: 3 hashes per tag, ~326 codes each (200-400, docs/scaling.md).
    b = memory.code_buckets_for(1_000_000)
    per_hash = 1_000_000 / (1024 * b)
    assert 200 <= per_hash <= 400
    assert memory.code_buckets_for(100) == 1


def test_kind_of_reads_the_segment_after_the_hash_tag():
    assert memory.kind_of("tc:{0012}:i:8123") == "i"
    assert memory.kind_of("tc:{0012}:audit") == "audit"
    assert memory.kind_of("tc-job-x:{0012}:reg") == "reg"
