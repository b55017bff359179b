"""Issue 26, deliverable 2: the leads engine on a real Spark standalone cluster (a master and two
workers on loopback, started from pyspark's own distribution by tests/spark_cluster.py), the
driver's JVM capped at 512 MB. One run over one input that holds the model tests' planted
history (tests/test_leads_models.py), every damaged file of the holes tests
(tests/test_leads_holes.py) and a noisy generated history (leads/synth.py, CSV and gzipped
JSONL): against a DuckDB run over the same files it must give byte-identical leads, evidence,
errors and per-line verdicts, find every planted subject and no decoy, and account for every
row of every damaged file. One cluster run, asserted several ways, keeps the suite's time.

The cluster must start: no Java or a cluster that does not come up fails the tests, it never
skips them (scripts/test installs Java from scripts/system-deps.txt).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading

import pytest

from spark_cluster import SparkStandalone, process_tree
from test_leads_holes import MALFORMED, _accounted, _issuance
from test_leads_models import RAW, planted
from tracecode.leads import synth
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file

DRIVER_MEMORY = "512m"
SYNTH_LINES = 20_000


@pytest.fixture(scope="session")
def spark_cluster():
    """Two workers of one core and 1 GB each (the machine is shared); stopped at the end."""
    with SparkStandalone(workers=2, cores=1, memory="1g", driver_memory=DRIVER_MEMORY) as cluster:
        yield cluster


def _inputs(d: str) -> dict:
    p, expected = planted()
    h = synth.history(SYNTH_LINES, seed=26)
    damaged = {case: MALFORMED[case](d) for case in sorted(MALFORMED)}
    files = [synth.write_csv(os.path.join(d, "planted.csv"), p.rows, synth.SETTLEMENT_COLUMNS),
             *[path for path, _ in damaged.values()],
             synth.write_csv(os.path.join(d, "synth-a.csv"), h.files[0], synth.SETTLEMENT_COLUMNS),
             synth.write_jsonl(os.path.join(d, "synth-b.jsonl.gz"), h.files[1])]
    issuance = [synth.write_csv(os.path.join(d, "planted-issuance.csv"), p.issuance,
                                ["code", "product_id", "pack_units"]),
                _issuance(d),
                synth.write_parquet(os.path.join(d, "synth-issuance.parquet"), h.issuance, synth.ISSUANCE_COLUMNS)]
    sites = synth.write_csv(os.path.join(d, "sites.csv"), p.sites + h.sites, ["site_id", "site_kind", "region", "name"])
    key = os.path.join(d, "pseudonym.key")
    generate_key_file(key)
    receipts = [synth.write_csv(os.path.join(d, f"receipts-{n}.csv"), rows, ["site_id", "code", "delivery_id",
                                                                             "received_at"])
                for n, rows in enumerate(p.receipts)]
    return {"files": files, "issuance": issuance, "sites": sites, "key": key, "damaged": damaged, "receipts": receipts,
            "expected": expected, "planted_sites": {r["site_id"] for r in p.rows}}


def _leads_cmd(inp: dict, out: str, *engine: str) -> list[str]:
    return [sys.executable, "-m", "tracecode.cli", "leads", *inp["files"], "--issuance", *inp["issuance"],
            "--sites", inp["sites"], "--receipts", *inp["receipts"], "--out", out, "--pseudonym-key", inp["key"],
            "--lines", "--quiet", *engine]


def _run_watching_jvms(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """The command, and the argv of every JVM in its process tree while it ran (the driver's)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen: dict[int, list[str]] = {}
    done = threading.Event()

    def watch():
        while not done.wait(0.2):
            for pid in process_tree(proc.pid):
                if pid in seen:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        argv = [a.decode() for a in fh.read().split(b"\0") if a]
                except OSError:
                    continue
                if argv and os.path.basename(argv[0]) == "java":
                    seen[pid] = argv
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=1200)
    finally:
        done.set()
        th.join()
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), list(seen.values())


@pytest.fixture(scope="module")
def runs(spark_cluster, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("standalone"))
    inp = _inputs(d)
    duck = os.path.join(d, "out-duckdb")
    done = subprocess.run(_leads_cmd(inp, duck), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    spark = os.path.join(d, "out-standalone")
    # The driver runs in its own process, as `tracecode leads` does: its JVM starts there with
    # the cluster's spark-defaults.conf (the memory cap), not inside this test process.
    done, jvms = _run_watching_jvms(
        _leads_cmd(inp, spark, "--engine", "spark", "--spark-master", spark_cluster.master_url),
        spark_cluster.client_env())
    assert done.returncode == 0, done.stderr[-3000:] + spark_cluster.log_tail()
    return {"input": inp, "duck": duck, "spark": spark, "driver_jvms": jvms}


def test_the_run_used_both_workers_with_the_driver_capped(spark_cluster, runs):
    state = spark_cluster.state()
    assert sum(w["state"] == "ALIVE" for w in state["workers"]) == 2
    apps = [a for a in state["completedapps"] if a["name"] == "tracecode-leads"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED", state["completedapps"]
    # An executor of the run on each worker: two JVMs of their own, not local mode.
    for i in range(2):
        worker = spark_cluster.worker_state(i)
        assert apps[0]["id"] in {e["appid"] for e in worker["finishedexecutors"] + worker["executors"]}, i
    # The driver's JVM (spark-submit's; the launcher JVM before it only builds its command line).
    # By command line: a process the JVM forks to run a command (Hadoop's shell helpers) shows the
    # JVM's own command line until it execs, and the watch may catch it in between.
    drivers = {tuple(argv) for argv in runs["driver_jvms"]
               if "org.apache.spark.deploy.SparkSubmit" in argv and "org.apache.spark.launcher.Main" not in argv}
    assert len(drivers) == 1, runs["driver_jvms"]
    assert f"-Xmx{DRIVER_MEMORY}" in next(iter(drivers))


@pytest.mark.parametrize("name", ["leads.csv", "evidence.csv", "errors.csv", "lines.csv"])
def test_the_cluster_gives_byte_identical_outputs_to_duckdb(runs, name):
    with open(os.path.join(runs["duck"], name), "rb") as a, open(os.path.join(runs["spark"], name), "rb") as b:
        duck, spark = a.read(), b.read()
    assert duck.count(b"\n") > 1, name  # a header and rows, not two empty files
    assert duck == spark, name


def test_each_model_finds_its_planted_subjects_and_no_decoy_on_the_cluster(runs):
    inp = runs["input"]
    with open(os.path.join(runs["spark"], "leads.csv"), newline="", encoding="utf-8") as fh:
        leads = list(csv.DictReader(fh))
    pz = Pseudonymizer.from_file(inp["key"])
    persons = {pz(raw): name for name, raw in RAW.items()}
    ours = inp["planted_sites"] | set(persons)

    def planted_subject(s: str) -> bool:  # the generated history's subjects are not the plant's
        return all(part in ours for part in s.split("+"))
    named = {m: {persons.get(ld["subject_id"], ld["subject_id"]) for ld in leads
                 if ld["model"] == m and planted_subject(ld["subject_id"])} for m in inp["expected"]}
    assert named == inp["expected"]
    b1 = next(ld for ld in leads if ld["model"] == "RESALE_BUYER" and ld["subject_id"] == "B1")
    assert (b1["packs"], b1["lines"], b1["amount"]) == ("2", "4", "21.00")
    # The generated history has leads of its own too: the run judged more than the plant.
    assert len(leads) > sum(map(len, inp["expected"].values()))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_row_of_a_damaged_file_is_judged_or_reported_on_the_cluster(runs, case):
    path, expected = runs["input"]["damaged"][case]
    _accounted(runs["spark"], path, expected)
