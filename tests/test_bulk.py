"""Bulk re-verification over real gRPC and Redis: planted fraud found exactly, resumable jobs."""
from __future__ import annotations

import csv
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from tracecode.clients.files import Row
from tracecode.clients.pos import PosClient, line
from tracecode.clients.reverify import run_job
from tracecode.rules.pseudonym import Pseudonymizer
from tracecode.v1 import bulk_pb2, bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, load

CST = timezone(timedelta(hours=8))
FIELDS = ["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units", "insured_id"]


def make_dataset(tmp_path, admin, seed=11):
    """~400 settlements over 40 sites in two time-overlapping files, with planted fraud:
    5 resold packs between unrelated sites, 4 swapped products (串换), a ring R1->R2->R3->R1
    reselling 3 packs along each edge, one row missing its product, one unknown column."""
    rnd = random.Random(seed)
    products = ["8100001", "8100002", "8100003"]
    codes = {p: [cn20(p) for _ in range(300)] for p in products}
    load(admin, *(Row("t", 0, {"code": c, "product_id": p}) for p, cs in codes.items() for c in cs))
    pool = [(c, p) for p, cs in codes.items() for c in cs]
    rnd.shuffle(pool)
    start = datetime(2024, 5, 6, 9, 0, tzinfo=CST)
    events = []  # (time, site, lines)
    t = start
    sites = [f"S{n:03d}" for n in range(40)]
    for _ in range(380):
        t += timedelta(seconds=rnd.randint(5, 60))
        k = rnd.randint(1, 3)
        lines = [pool.pop() for _ in range(k)]
        events.append((t, rnd.choice(sites), [(c, p) for c, p in lines]))
    expected = {"DUPLICATE": [], "PRODUCT_MISMATCH": []}
    # Resold packs: a code dispensed at one site turns up later at an unrelated one.
    for i in range(5):
        t0, site0, lines0 = events[10 + i * 30]
        code, prod = lines0[0]
        later = t0 + timedelta(hours=2)
        other = next(s for s in sites if s != site0 and s not in ("R1", "R2", "R3"))
        events.append((later, other, [(code, prod)]))
        expected["DUPLICATE"].append((other, code))
    # Swaps: billed product differs from the issued one.
    for i in range(4):
        code, prod = pool.pop()
        wrong = next(p for p in products if p != prod)
        events.append((start + timedelta(hours=1, minutes=i), rnd.choice(sites), [(code, wrong)]))
        expected["PRODUCT_MISMATCH"].append(code)
    # The ring: each edge resells 3 packs.
    ring_t = start + timedelta(hours=3)
    for a, b in (("R1", "R2"), ("R2", "R3"), ("R3", "R1")):
        for _ in range(3):
            code, prod = pool.pop()
            events.append((ring_t, a, [(code, prod)]))
            events.append((ring_t + timedelta(minutes=30), b, [(code, prod)]))
            expected["DUPLICATE"].append((b, code))
            ring_t += timedelta(minutes=1)
    events.sort(key=lambda e: e[0])
    rows = []
    for n, (when, site, lines) in enumerate(events):
        for ln, (code, prod) in enumerate(lines, 1):
            rows.append({"site_id": site, "settlement_id": f"T{n:05d}", "settled_at": when.isoformat(),
                         "line_no": ln, "code": code, "product_id": prod, "units": "",
                         "insured_id": f"h{rnd.randrange(10**6):06x}"})
    # Two files overlapping in time: alternate settlements between them.
    a_rows = [r for r in rows if int(r["settlement_id"][1:]) % 2 == 0]
    b_rows = [r for r in rows if int(r["settlement_id"][1:]) % 2 == 1]
    a_rows.insert(7, {**a_rows[7], "settlement_id": "BAD1", "product_id": ""})  # a bad row
    fa = tmp_path / "export-a.csv"
    with open(fa, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, FIELDS + ["pharmacist"])
        w.writeheader()
        for r in a_rows:
            w.writerow({**r, "pharmacist": "x"})
    fb = tmp_path / "export-b.jsonl.gz"
    with gzip.open(fb, "wt", encoding="utf-8") as fh:
        for r in b_rows:
            fh.write(json.dumps(r) + "\n")
    return [str(fa), str(fb)], expected, len(rows)


def flagged_rows(out_dir):
    with open(os.path.join(out_dir, "flagged.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_replay_finds_exactly_the_planted_fraud(tmp_path, admin, target):
    files, expected, n_rows = make_dataset(tmp_path, admin)
    out = tmp_path / "report"
    # Small chunks and streams: the job crosses many stream boundaries.
    summary = run_job(target, files, str(out), job_id="planted-1", chunk_size=37, progress=False, stream_chunks=3)
    flagged = flagged_rows(out)
    dups = sorted((r["site_id"], r["code"]) for r in flagged if r["verdict"] == "DUPLICATE")
    swaps = sorted(r["code"] for r in flagged if r["verdict"] == "PRODUCT_MISMATCH")
    assert dups == sorted(expected["DUPLICATE"])
    assert swaps == sorted(expected["PRODUCT_MISMATCH"])
    assert {r["verdict"] for r in flagged} == {"DUPLICATE", "PRODUCT_MISMATCH"}
    assert summary["records"] == n_rows and summary["bad_records"] == 1
    assert summary["rings"] == [["R1", "R2", "R3"]]
    top = {(p["first_site_id"], p["later_site_id"]): p["duplicates"] for p in summary["top_pairs"]}
    assert top[("R1", "R2")] == top[("R2", "R3")] == top[("R3", "R1")] == 3
    # Evidence and pass-through fields are in the flagged rows.
    d = next(r for r in flagged if r["verdict"] == "DUPLICATE" and r["site_id"] == "R2")
    assert d["first_site_id"] == "R1" and d["first_settlement_id"]
    # The file's insured id comes back as its pseudonym, never as the raw id (docs/security.md).
    assert Pseudonymizer.looks_like_pseudonym(d["insured_id"]) and Pseudonymizer.looks_like_pseudonym(d["first_insured_id"])
    assert d["first_insured_id"] != d["insured_id"]
    with open(out / "errors.csv", encoding="utf-8") as fh:
        errors = list(csv.DictReader(fh))
    assert len(errors) == 1 and errors[0]["field"] == "product_id" and errors[0]["file"].endswith("export-a.csv")
    assert not (out / "checkpoint.json").exists()
    # REPLAY is isolated: live state untouched (the packs it replayed are still unsold live)...
    with PosClient(target) as pos:
        for _, code in expected["DUPLICATE"]:
            assert pos.history(code).units_used == 0, code
    # ...and the job namespace was dropped.
    stub = bulk_pb2_grpc.BulkVerificationStub(grpc.insecure_channel(target))
    assert stub.DropJob(bulk_pb2.DropJobRequest(job_id="planted-1")).keys_deleted == 0


def test_dropping_a_job_unlinks_every_key_it_wrote(tmp_path, admin, target, store):
    # The drop reads the job's registries instead of scanning the keyspace: a key the scripts
    # wrote without registering it would survive the drop (until the job's TTL). SCAN here, in
    # the test, is the independent count.
    files, _, n_rows = make_dataset(tmp_path, admin, seed=12)
    run_job(target, files, str(tmp_path / "report"), job_id="kept-1", keep_namespace=True,
            chunk_size=50, progress=False)
    prefix = f"{store.keys.prefix}-job-kept-1:"
    held = set(store.r.scan_iter(match=prefix + "*", count=1000))
    registries = {k for k in held if k.endswith(":reg")}
    assert registries and len(held) - len(registries) > n_rows  # a state per code, a record per settlement
    stub = bulk_pb2_grpc.BulkVerificationStub(grpc.insecure_channel(target))
    assert stub.DropJob(bulk_pb2.DropJobRequest(job_id="kept-1")).keys_deleted == len(held) - len(registries)
    assert not list(store.r.scan_iter(match=prefix + "*", count=1000))
    assert stub.DropJob(bulk_pb2.DropJobRequest(job_id="kept-1")).keys_deleted == 0


def test_replay_does_not_touch_live_state(tmp_path, admin, target, pos):
    code = cn20("8100009")
    load(admin, Row("t", 0, {"code": code, "product_id": "8100009"}))
    f = tmp_path / "one.csv"
    f.write_text("site_id,settlement_id,settled_at,line_no,code,product_id\n"
                 f"S1,X1,2024-05-06T10:15:00+08:00,1,{code},8100009\n"
                 f"S2,X2,2024-05-07T10:15:00+08:00,1,{code},8100009\n")
    s = run_job(target, [str(f)], str(tmp_path / "r"), job_id="iso", progress=False)
    assert s["verdicts"] == {"OK": 1, "DUPLICATE": 1}
    assert pos.verify("S9", [line(code, "8100009")]).results[0].verdict == pb.OK


def test_check_mode_judges_against_live_state_and_marks_nothing(tmp_path, admin, target, pos):
    a, b = cn20("8100010"), cn20("8100010")
    load(admin, *(Row("t", 0, {"code": c, "product_id": "8100010"}) for c in (a, b)))
    now = datetime.now(CST).replace(microsecond=0)
    pos.verify("LIVE1", [line(a, "8100010")], settlement_id="L1", settled_at=now)
    f = tmp_path / "check.csv"
    f.write_text("site_id,settlement_id,settled_at,line_no,code,product_id\n"
                 f"LIVE1,L1,{now.isoformat()},1,{a},8100010\n"   # the live settlement itself
                 f"OTHER,O1,{now.isoformat()},1,{a},8100010\n"   # resold elsewhere
                 f"OTHER,O2,{now.isoformat()},1,{b},8100010\n")  # never dispensed
    s = run_job(target, [str(f)], str(tmp_path / "r"), job_id="chk", mode="check", progress=False)
    assert s["verdicts"] == {"OK": 2, "DUPLICATE": 1}
    assert pos.history(b).units_used == 0  # CHECK marked nothing


def _summary_without_timing(path):
    with open(path, encoding="utf-8") as fh:
        s = json.load(fh)
    s.pop("seconds_this_run")
    s.pop("job_id")
    return s


def test_killed_job_resumes_to_the_same_report(tmp_path, admin, target):
    files, expected, n_rows = make_dataset(tmp_path, admin, seed=12)
    ref = tmp_path / "ref"
    run_job(target, files, str(ref), job_id="ref-job", chunk_size=5, progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tracecode.cli", "reverify", *files, "--server", target,
           "--out", str(out), "--job-id", "kill-job", "--chunk-size", "2", "--quiet", "--max-rate", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(out / "checkpoint.json", encoding="utf-8") as fh:
        done_before = json.load(fh)["report"]["records"]
    assert 0 < done_before < n_rows  # it really was interrupted midway

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _summary_without_timing(out / "summary.json") == _summary_without_timing(ref / "summary.json")
    key = lambda r: (r["settlement_id"], r["line_no"])
    assert sorted(flagged_rows(out), key=key) == sorted(flagged_rows(ref), key=key)
    assert (out / "network.csv").read_text() == (ref / "network.csv").read_text()


def test_first_message_must_be_options(target):
    stub = bulk_pb2_grpc.BulkVerificationStub(grpc.insecure_channel(target))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Reverify(iter([bulk_pb2.ReverifyRequest(chunk=bulk_pb2.SettlementChunk())])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _slicing_job(target, job_id: str, settlements) -> list[list[str]]:
    """One REPLAY job of one chunk over the raw stub: per settlement its verdicts, or its error."""
    at = datetime(2024, 5, 6, 9, 0, tzinfo=CST)
    chunk = bulk_pb2.SettlementChunk(chunk_seq=1)
    for n, (site, sid, codes) in enumerate(settlements):
        s = chunk.settlements.add(site_id=site, settlement_id=sid)
        s.settled_at.FromDatetime(at + timedelta(seconds=n))
        for code in codes:
            s.lines.add(raw_code=code, product_id="8123456")
    requests = [bulk_pb2.ReverifyRequest(options=bulk_pb2.JobOptions(mode=bulk_pb2.REPLAY, job_id=job_id)),
                bulk_pb2.ReverifyRequest(chunk=chunk),
                bulk_pb2.ReverifyRequest(finish=bulk_pb2.Finish(drop_namespace=True))]
    with grpc.insecure_channel(target) as channel:
        answers = list(bulk_pb2_grpc.BulkVerificationStub(channel).Reverify(iter(requests), timeout=60))
    assert [a.chunk_seq for a in answers] == [1]  # one answer per chunk, however it was sliced
    return [[pb.Verdict.Name(r.verdict) for r in s.results] or [s.error] for s in answers[0].results]


def test_a_chunk_runs_in_slices_smaller_beside_pos_traffic_with_the_same_answers(admin, target, pos,
                                                                               monkeypatch):
    """A job's chunk is judged in slices (small while the process serves POS calls); the answers
    must not depend on where the slices cut: a pack replayed again after a slice boundary is a
    DUPLICATE, errors stay in their settlement's place, and the chunk gets one answer, in order."""
    from tracecode.server import priority
    from tracecode.server.api import bulk
    monkeypatch.setattr(bulk, "SLICE_BESIDE_POS", 7)
    monkeypatch.setattr(bulk, "SLICE_ALONE", 50)
    seen: list[bool] = []
    real = priority.pos_traffic
    monkeypatch.setattr(priority, "pos_traffic", lambda: seen.append(real()) or seen[-1])

    codes = [cn20() for _ in range(120)]
    load(admin, *(Row("t", 0, {"code": c, "product_id": "8123456"}) for c in codes))
    settlements = [("SA", f"A{i}", [codes[i], codes[i + 1]]) for i in range(0, 120, 2)]  # 60, all OK
    settlements.insert(33, ("SA", "", [codes[0]]))  # no settlement id: an error in its place
    settlements += [("SB", f"B{i}", [codes[i]]) for i in range(0, 120, 9)]  # resold at another site
    expected = [["OK", "OK"]] * 33 + [["settlement_id: required: 1-64 characters of A-Z a-z 0-9 . _ -"]] + [["OK", "OK"]] * 27 + \
        [["DUPLICATE"]] * len(range(0, 120, 9))

    monkeypatch.setattr(priority, "WINDOW_S", 0.0)  # no POS traffic counts: large slices
    alone = _slicing_job(target, "slices-alone", settlements)
    assert seen and not any(seen)
    monkeypatch.setattr(priority, "WINDOW_S", 30.0)
    pos.check([line(codes[0], "8123456")])  # a POS call through this server: small slices now
    seen.clear()
    beside = _slicing_job(target, "slices-beside-pos", settlements)
    assert seen and all(seen) and len(seen) >= len(settlements) // 7
    assert alone == beside == expected


def test_workers_share_the_pos_clock_across_processes(tmp_path):
    """With --workers N a POS call answered by one worker makes a job on another yield: the
    timestamp lives in a file each process maps. Here the POS call happens in a real other
    process; this one, attached to the same file, sees the traffic."""
    from tracecode.server import priority
    path = priority.create_shared(str(tmp_path))
    priority.attach(path)
    try:
        assert not priority.pos_traffic()
        code = ("from tracecode.server import priority\n"
                "priority.foreground(lambda: None)()\n"
                "assert priority.pos_traffic()\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                       env=dict(os.environ, **{priority.SHARED_ENV: path}))
        assert priority.pos_traffic()
    finally:
        priority.attach(None)
