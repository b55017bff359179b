"""The leads engine at 1M, 3M and 10M lines against the bulk REPLAY path on the same 1M lines.

    python benchmarks/leads.py [--sizes 1,3,10] [--data DIR] [--no-replay] [--no-spark]
                               [--standalone 1,10 | --spark-master spark://HOST:PORT --standalone 1]
                               [--incremental 1,3 [--merge-incremental]] [--keep-others]

Generates a history of monthly settlement exports (Parquet, 1M lines each: packs scanned as
20-digit codes and as GS1 strings, ~1 % resold, swaps, expired, blocked, unknown, malformed
codes, split packs) with their issuance files and a site registry; the 1M / 3M / 10M runs read
the first 1 / 3 / 10 months. Each run is `tracecode leads` in its own process (wall time end to
end: read, canonicalise, every model, write; peak RSS from /proc VmHWM). The same 1M lines go
through `tracecode load` + `tracecode reverify --mode replay` against `tracecode serve` on a fresh
Redis (load not timed), and through `tracecode leads --engine spark` (local[2]).

`--standalone SIZES`: the same runs on a Spark standalone cluster (`--engine spark --spark-master
spark://…`), by default one started here as the tests start theirs (tests/spark_cluster.py: a
master and two workers of one core and `--worker-memory` each, from pyspark's own distribution),
the driver's JVM capped at `--driver-memory`; or the cluster at `--spark-master`. Each size is
compared with DuckDB's output of the same size in the same run (leads, evidence, errors).
`--incremental SIZES`: incremental runs (docs/leads.md, Incremental runs): for m million lines
of history, a full run over the first m months that saves its state (`--state`), then one more
day (m million / 30 lines: the start of month m+1, with the issuance of its packs) added to that
state, against a full run over the history and that day; the leads and evidence of the two must
be byte-identical. `--merge-incremental` writes only that section into the existing results.
Writes benchmarks/results/leads.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
# The standalone cluster of the tests (one definition of how to start and stop one).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from spark_cluster import SparkStandalone, process_tree  # noqa: E402

from tracecode import codec  # noqa: E402
from tracecode.leads.synth import CST  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.rules.insured import resident_check_char  # noqa: E402
from tracecode.rules.pseudonym import generate_key_file  # noqa: E402

MONTH_LINES = 1_000_000
N_SITES = 4000
N_PEOPLE = 1_500_000


@functools.lru_cache(maxsize=None)
def resident_id(n: int) -> str:
    """Person n's resident id: 17 digits and its GB 11643 check character (the engine refuses
    an id whose check character is wrong, as the server does)."""
    first17 = f"{110101 + n % 400:06d}{n:011d}"
    return first17 + resident_check_char(first17)


def generate_month(data: str, k: int) -> tuple[str, str]:
    """Month k: its settlement export and its issuance file (Parquet, all text as exported)."""
    lines_path = os.path.join(data, f"settlements-{k:02d}.parquet")
    iss_path = os.path.join(data, f"issuance-{k:02d}.parquet")
    if os.path.exists(lines_path) and os.path.exists(iss_path):
        return lines_path, iss_path
    rnd = random.Random(1000 + k)
    products = [f"8{n:06d}" for n in range(100_000, 100_400)]
    t = datetime(2024, 1, 1, 8, 0, tzinfo=CST) + timedelta(days=30 * k)
    cols = {c: [] for c in ("site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units",
                            "insured_id", "amount")}
    iss = {c: [] for c in ("code", "product_id", "expiry", "pack_units", "status")}
    serial = k * 10_000_000
    n = 0
    recent: list[tuple[str, str]] = []
    while len(cols["code"]) < MONTH_LINES:
        n += 1
        t += timedelta(seconds=rnd.randint(1, 4))
        when = t.isoformat()
        site = f"S{rnd.randrange(N_SITES):05d}"
        person = resident_id(rnd.randrange(N_PEOPLE))
        for ln in range(1, rnd.choice((1, 1, 1, 2, 2, 3)) + 1):
            x = rnd.random()
            units = ""
            product = products[rnd.randrange(400)]
            if x < 0.01 and recent:  # a pack sold before, again
                code, product = recent[rnd.randrange(len(recent))]
            elif x < 0.013:
                serial += 1
                code = f"{product}{serial:09d}0000"  # never issued
            elif x < 0.015:
                code = f"{product}{serial:09d}00"  # 18 digits: malformed
            else:
                serial += 1
                expiry = "2026-12-31"
                status = ""
                pu = ""
                if x < 0.018:
                    expiry = "2023-06-30"
                elif x < 0.019:
                    status = "RECALLED"
                elif x < 0.03:
                    pu, units = "10", str(rnd.choice((2, 3, 5)))
                if x > 0.9:  # GS1: issued as an element string, scanned raw with its symbology id
                    base = f"069{serial:010d}"
                    gtin = base + str(codec.gtin_check_digit(base))
                    issued, code = f"(01){gtin}(21)S{serial}", f"]d201{gtin}21S{serial}"
                else:
                    issued = code = f"{product}{serial:09d}{serial * 7919 % 10000:04d}"
                for c, v in (("code", issued), ("product_id", product), ("expiry", expiry), ("pack_units", pu),
                             ("status", status)):
                    iss[c].append(v)
                if len(recent) < 200_000:
                    recent.append((code, product))
                else:
                    recent[rnd.randrange(200_000)] = (code, product)
            if rnd.random() < 0.005:
                product = products[rnd.randrange(400)]  # 串换
            for c, v in (("site_id", site), ("settlement_id", f"M{k:02d}T{n:08d}"), ("settled_at", when),
                         ("line_no", str(ln)), ("code", code), ("product_id", product), ("units", units),
                         ("insured_id", person), ("amount", f"{rnd.randint(100, 30000) / 100:.2f}")):
                cols[c].append(v)
    pq.write_table(pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()}), lines_path)
    pq.write_table(pa.table({c: pa.array(v, pa.string()) for c, v in iss.items()}), iss_path)
    return lines_path, iss_path


def sites_file(data: str) -> str:
    path = os.path.join(data, "sites.csv")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("site_id,site_kind,region,name\n")
            for i in range(N_SITES):
                if i % 9:
                    fh.write(f"S{i:05d},{'PHARMACY' if i % 4 else 'INSTITUTION'},R{i % 40:02d},site {i}\n")
    return path


CPU = {}  # command name -> CPU seconds (user + system) of the process and its children
RSS_OTHERS = {}  # "last" -> peak MB of the processes timed() watched beside the command's own


def vm_rss_mb(pid: int) -> float:
    return common.proc_mb(pid, "status", "VmRSS:")


def pss_mb(pid: int) -> float:
    """A process's proportional set size: its private pages plus its share of pages it shares
    (the staging workers are forked, so the parent's pages are in each worker's RSS too, and a
    sum of RSS would count them once per worker). VmRSS where smaps_rollup is not readable."""
    return common.proc_mb(pid, "smaps_rollup", "Pss:") or vm_rss_mb(pid)


def timed(cmd: list[str], watch_tree: bool = True, env: dict | None = None,
          others: list[int] = ()) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB (with watch_tree: the peak of the sum of PSS over the process
    and its children, sampled every 0.1 s, e.g. the staging workers or Spark's JVM, or the
    process's own VmHWM if higher; else the process's VmHWM), stdout. Its CPU seconds (children
    included) go to CPU["last"]; the peak of the sum over the trees of `others` (a cluster's
    daemons, their executors) to RSS_OTHERS["last"]."""
    import resource
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    hwm = [0.0]
    RSS_OTHERS["last"] = 0.0
    done = threading.Event()

    def watch():
        while not done.wait(0.1):
            if watch_tree:
                hwm[0] = max(hwm[0], sum(pss_mb(p) for p in common.process_tree(proc.pid)),
                             common.vm_hwm_mb(proc.pid))
            else:
                hwm[0] = max(hwm[0], common.vm_hwm_mb(proc.pid))
            if others:
                RSS_OTHERS["last"] = max(RSS_OTHERS["last"],
                                         sum(vm_rss_mb(p) for o in others for p in process_tree(o)))
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU["last"] = round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {err[-3000:]}")
    return elapsed, hwm[0], out.strip()


def leads_cmd(files, issuance, sites, out, key, engine="duckdb", master: str | None = None) -> list[str]:
    return [common.python(), "-m", "tracecode.cli", "leads", *files, "--issuance", *issuance,
            "--sites", sites, "--out", out, "--pseudonym-key", key, "--engine", engine, "--quiet",
            *(["--spark-master", master] if master else [])]


def identical(out: str, duck_out: str) -> bool | None:
    """Leads, evidence and errors byte-identical to DuckDB's of the same size (None: no DuckDB run)."""
    if not os.path.isdir(duck_out):
        return None
    return all(open(os.path.join(out, f), "rb").read() == open(os.path.join(duck_out, f), "rb").read()
               for f in ("leads.csv", "evidence.csv", "errors.csv"))


def day_file(data: str, k: int, n_lines: int) -> tuple[str, str]:
    """The first n_lines of month k (cut at a settlement's end), and the issuance records of the
    packs they name (in the month's issuance order)."""
    lines_path = os.path.join(data, f"day-{k:02d}-{n_lines}.parquet")
    iss_path = os.path.join(data, f"day-issuance-{k:02d}-{n_lines}.parquet")
    if os.path.exists(lines_path) and os.path.exists(iss_path):
        return lines_path, iss_path
    month, month_iss = generate_month(data, k)
    t = pq.read_table(month)
    ids = t["settlement_id"].to_pylist()
    end = n_lines
    while end < len(ids) and ids[end] == ids[end - 1]:
        end += 1
    day = t.slice(0, end)
    issued = set()
    for code in day["code"].to_pylist():  # GS1 packs are issued as element strings, scanned raw
        issued.add(f"(01){code[5:19]}(21){code[21:]}" if code.startswith("]d201") else code)
    iss = pq.read_table(month_iss)
    keep = pa.array([c in issued for c in iss["code"].to_pylist()])
    pq.write_table(day, lines_path)
    pq.write_table(iss.filter(keep), iss_path)
    return lines_path, iss_path


def incremental_runs(args, months, sites, key, work, doc) -> None:
    """For each size: full run with --state, one more day added to it, full run over both."""
    doc["incremental"] = {"command": doc["command"], "date": doc["machine"]["date"], "engine": "duckdb"}
    for m in [int(s) for s in args.incremental.split(",")]:
        day, day_iss = day_file(args.data, m, m * MONTH_LINES // 30)
        files, iss = [f for f, _ in months[:m]], [i for _, i in months[:m]]
        state = os.path.join(work, f"state-{m}M")
        out_first, out_incr, out_full = (os.path.join(work, f"{x}-{m}M") for x in ("first", "incr", "full-day"))
        first_s, first_rss, _ = timed(leads_cmd(files, iss, sites, out_first, key) + ["--state", state])
        first_cpu = CPU["last"]
        incr_s, incr_rss, _ = timed(leads_cmd([day], [day_iss], sites, out_incr, key) + ["--state", state])
        incr_cpu = CPU["last"]
        full_s, full_rss, _ = timed(leads_cmd(files + [day], iss + [day_iss], sites, out_full, key))
        full_cpu = CPU["last"]
        same = all(open(os.path.join(out_incr, f), "rb").read() == open(os.path.join(out_full, f), "rb").read()
                   for f in ("leads.csv", "evidence.csv", "leads.parquet", "evidence.parquet"))
        with open(os.path.join(out_incr, "summary.json"), encoding="utf-8") as fh:
            inc_sum = json.load(fh)
        with open(os.path.join(out_first, "summary.json"), encoding="utf-8") as fh:
            first_sum = json.load(fh)
        state_mb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(state) for f in fs) / 2**20
        doc["incremental"][f"{m}M"] = {
            "history_lines": first_sum["lines"], "day_lines": inc_sum["lines"],
            "full_with_state_s": round(first_s, 2), "full_with_state_cpu_s": first_cpu,
            "incremental_s": round(incr_s, 2), "incremental_cpu_s": incr_cpu,
            "full_over_history_and_day_s": round(full_s, 2), "full_over_history_and_day_cpu_s": full_cpu,
            "incremental_share_of_full": round(incr_s / full_s, 3),
            "incremental_share_of_full_cpu": round(incr_cpu / full_cpu, 3), "leads_evidence_identical": same,
            "state_mb_after": round(state_mb, 1), "incremental_stages_s": inc_sum["seconds"],
            "peak_rss_mb": {"full_with_state": round(first_rss), "incremental": round(incr_rss),
                            "full": round(full_rss)},
            "load_average_after": os.getloadavg()[0]}
        print(f"incremental {m}M + {inc_sum['lines']:,} lines: full with state {first_s:.1f} s, incremental "
              f"{incr_s:.1f} s, full over both {full_s:.1f} s ({incr_s / full_s:.1%}; CPU {incr_cpu:.1f} / "
              f"{full_cpu:.1f} s); identical: {same}; "
              f"state {state_mb:.0f} MB", flush=True)


def standalone_runs(args, months, sites, key, work, doc) -> None:
    """The --standalone sizes on a standalone cluster: started here unless --spark-master names one."""
    sizes = [int(s) for s in args.standalone.split(",")]
    cluster = None
    if args.spark_master:
        master, env = args.spark_master, None
        about = {"master": master, "cluster": "given (--spark-master); driver memory from its SPARK_CONF_DIR"}
    else:
        cluster = SparkStandalone(workers=2, cores=1, memory=args.worker_memory,
                                  driver_memory=args.driver_memory).start()
        master, env = cluster.master_url, cluster.client_env()
        about = {"master": "spark://127.0.0.1:PORT (started by the benchmark, tests/spark_cluster.py)",
                 "workers": 2, "cores_per_worker": 1, "memory_per_worker": args.worker_memory,
                 "driver_memory": args.driver_memory}
    doc["spark_standalone"] = {"command": doc["command"], "date": doc["machine"]["date"], "cluster": about}
    try:
        for m in sizes:
            out = os.path.join(work, f"standalone-{m}M")
            daemons = [p.pid for p in cluster.procs] if cluster else []
            secs, rss, line = timed(leads_cmd([f for f, _ in months[:m]], [i for _, i in months[:m]], sites, out, key,
                                              "spark", master), env=env, others=daemons)
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
                summary = json.load(fh)
            same = identical(out, os.path.join(work, f"duck-{m}M"))
            input_mb = sum(os.path.getsize(p) for f, i in months[:m] for p in (f, i)) / 2**20
            doc["spark_standalone"][f"{m}M"] = {
                "lines": summary["lines"], "seconds": round(secs, 2), "lines_per_s": round(summary["lines"] / secs),
                "cpu_seconds_driver": CPU["last"], "peak_rss_mb_driver": round(rss),
                "peak_rss_mb_cluster": round(RSS_OTHERS["last"]) if cluster else None,
                "input_mb_parquet": round(input_mb), "stages_s": summary["seconds"],
                "leads_identical_to_duckdb": same, "load_average_after": os.getloadavg()[0]}
            duck = doc["duckdb"].get(f"{m}M")
            if duck:  # beside it, DuckDB's time of the same run (the file may keep an older DuckDB section)
                doc["spark_standalone"][f"{m}M"].update(duckdb_seconds_same_run=duck["seconds"],
                                                        duckdb_peak_rss_mb_same_run=duck["peak_rss_mb"])
            print(f"spark standalone {m}M: {secs:.1f} s (DuckDB {duck['seconds'] if duck else '-'} s); "
                  f"identical leads: {same}; driver tree peak RSS {rss:.0f} MB; {line}", flush=True)
    finally:
        if cluster:
            cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,3,10", help="millions of lines (months of 1M)")
    # -v2: persons' ids carry valid check characters since issue 23 (older data would be refused).
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tracecode-bench-leads-v2"))
    ap.add_argument("--no-replay", action="store_true")
    ap.add_argument("--no-spark", action="store_true", help="no Spark local-mode run")
    ap.add_argument("--standalone", default="", help="sizes (millions) to run on a Spark standalone cluster")
    ap.add_argument("--spark-master", help="that cluster's master URL (default: start one here)")
    ap.add_argument("--driver-memory", default="512m", help="the driver's JVM on the started cluster")
    ap.add_argument("--worker-memory", default="1g", help="each worker's (and so its executor's) memory")
    ap.add_argument("--incremental", default="", help="sizes (millions) of history for incremental runs")
    ap.add_argument("--merge-incremental", action="store_true",
                    help="write only the incremental section into the existing results file")
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the sections of the existing results file that this run does not write "
                         "(e.g. the Spark ones with --no-spark), each with the command and date it has")
    ap.add_argument("--merge-standalone", action="store_true",
                    help="write only the Spark sections (spark_standalone, and spark_local_1M unless "
                         "--no-spark) into the existing results file")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip() and int(s)]
    standalone = [int(s) for s in args.standalone.split(",")] if args.standalone else []
    incremental = [int(s) for s in args.incremental.split(",")] if args.incremental else []
    os.makedirs(args.data, exist_ok=True)
    t0 = time.perf_counter()
    n_months = max(sizes + standalone + [m + 1 for m in incremental])
    months = [generate_month(args.data, k) for k in range(n_months)]
    print(f"data: {n_months} month(s) of {MONTH_LINES:,} lines in {args.data} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    sites = sites_file(args.data)
    key = os.path.join(args.data, "pseudonym.key")
    if not os.path.exists(key):
        generate_key_file(key)
    work = tempfile.mkdtemp(prefix="tracecode-bench-leads-run-")
    doc = {"benchmark": "leads engine end to end (read, canonicalise, verdicts, all models, write)",
           "command": "python " + " ".join(["benchmarks/leads.py", *sys.argv[1:]]), "machine": common.machine(),
           "input": "Parquet settlement exports of 1M lines each (text columns) + issuance Parquet + site CSV",
           "duckdb": {}}
    for m in sizes:
        files = [f for f, _ in months[:m]]
        iss = [i for _, i in months[:m]]
        out = os.path.join(work, f"duck-{m}M")
        secs, rss, line = timed(leads_cmd(files, iss, sites, out, key))
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        lines = summary["lines"]
        doc["duckdb"][f"{m}M"] = {"lines": lines, "seconds": round(secs, 2), "lines_per_s": round(lines / secs),
                                  "cpu_seconds": CPU["last"], "load_average_after": os.getloadavg()[0],
                                  "peak_rss_mb": round(rss), "stages_s": summary["seconds"],
                                  "peak_rss_how": "sum of PSS over the process tree (forked staging workers included, shared pages "
                                                  "counted once), or the process's VmHWM if higher",
                                  "leads_per_model": summary["leads_per_model"], "verdicts": summary["verdicts"]}
        print(f"duckdb {m}M: {lines:,} lines in {secs:.1f} s = {lines / secs:,.0f} lines/s, peak RSS {rss:.0f} MB; "
              f"{line}", flush=True)
    base = doc["duckdb"].get("1M")
    if base:
        per_line = base["seconds"] / base["lines"]
        doc["growth"] = {k: round((v["seconds"] / v["lines"]) / per_line, 3) for k, v in doc["duckdb"].items()}
        doc["growth_cpu"] = {k: round((v["cpu_seconds"] / v["lines"]) / (base["cpu_seconds"] / base["lines"]), 3)
                             for k, v in doc["duckdb"].items()}
        print(f"cost per line relative to 1M: wall {doc['growth']}, CPU {doc['growth_cpu']}", flush=True)

    if not args.no_spark and sizes:
        out = os.path.join(work, "spark-1M")
        secs, rss, line = timed(leads_cmd([months[0][0]], [months[0][1]], sites, out, key, "spark"))
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        same = identical(out, os.path.join(work, "duck-1M"))
        doc["spark_local_1M"] = {"master": "local[2]", "seconds": round(secs, 2), "cpu_seconds": CPU["last"],
                                 "lines_per_s": round(summary["lines"] / secs), "peak_rss_mb": round(rss),
                                 "stages_s": summary["seconds"], "leads_identical_to_duckdb": same}
        print(f"spark local 1M: {secs:.1f} s; identical leads: {same}", flush=True)

    if standalone:
        standalone_runs(args, months, sites, key, work, doc)

    if incremental:
        incremental_runs(args, months, sites, key, work, doc)

    if not args.no_replay and base:
        rp = common.start_redis()
        store = make_store(Config(listen="127.0.0.1:0", metrics_port=0), rp.url)
        server = None
        try:
            server, port = common.start_serve(rp.url)
            target = f"127.0.0.1:{port}"
            load_s, _, load_line = timed([common.python(), "-m", "tracecode.cli", "load", months[0][1],
                                          "--server", target])
            print(f"issuance loaded in {load_s:.0f} s ({load_line})", flush=True)
            out = os.path.join(work, "replay-1M")
            secs, rss, line = timed([common.python(), "-m", "tracecode.cli", "reverify", months[0][0],
                                     "--server", target, "--out", out, "--job-id", "bench-leads", "--quiet"],
                                    watch_tree=False)
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
                rsum = json.load(fh)
            rate = rsum["records"] / secs
            doc["replay_1M"] = {"lines": rsum["records"], "seconds": round(secs, 2), "lines_per_s": round(rate),
                                "cli_cpu_seconds": CPU["last"],
                                "cli_peak_rss_mb": round(rss), "issuance_load_s_not_timed": round(load_s, 1),
                                "verdicts": rsum["verdicts"],
                                "verdicts_equal_engine": rsum["verdicts"] == base["verdicts"]}
            doc["speedup_vs_replay_1M"] = round(base["lines_per_s"] / rate, 1)
            print(f"replay 1M: {secs:.1f} s = {rate:,.0f} lines/s; engine/replay = {doc['speedup_vs_replay_1M']}x; "
                  f"same verdict counts: {doc['replay_1M']['verdicts_equal_engine']}", flush=True)
        finally:
            common.stop_all(server, store, rp)

    big = doc["duckdb"].get("10M")
    doc["targets"] = {
        ">= 20x REPLAY lines/s on the same 1M": doc.get("speedup_vs_replay_1M", 0) >= 20,
        "10M end to end < 60 s": bool(big) and big["seconds"] < 60,
        "10M peak RSS < 2 GB": bool(big) and big["peak_rss_mb"] < 2048,
        "3M and 10M within 1.3x of linear": all(v <= 1.3 for v in doc.get("growth", {}).values()) and
        {"3M", "10M"} <= set(doc.get("growth", {})),
        "Spark standalone 10M, driver 512 MB, leads identical to DuckDB's":
        doc.get("spark_standalone", {}).get("10M", {}).get("leads_identical_to_duckdb") is True and
        doc["spark_standalone"]["cluster"].get("driver_memory") == "512m",
    }
    print(json.dumps(doc["targets"], indent=1))
    inc = doc.get("incremental", {})
    doc["targets"]["incremental: one more day (1/30) in < 10 % of a full run's time"] = \
        bool(inc) and all(v["incremental_share_of_full"] < 0.10 and v["leads_evidence_identical"]
                          for k, v in inc.items() if k.endswith("M"))
    if args.merge_incremental:
        with open(os.path.join(common.RESULTS, "leads.json"), encoding="utf-8") as fh:
            kept = json.load(fh)
        kept["incremental"] = doc["incremental"]
        kept["targets"]["incremental: one more day (1/30) in < 10 % of a full run's time"] = \
            doc["targets"]["incremental: one more day (1/30) in < 10 % of a full run's time"]
        doc = kept
    if args.merge_standalone:
        with open(os.path.join(common.RESULTS, "leads.json"), encoding="utf-8") as fh:
            kept = json.load(fh)
        for section in ("spark_standalone", "spark_local_1M"):
            if section in doc:
                kept[section] = doc[section]
        kept["targets"]["Spark standalone 10M, driver 512 MB, leads identical to DuckDB's"] = \
            doc["targets"]["Spark standalone 10M, driver 512 MB, leads identical to DuckDB's"]
        doc = kept
    if args.keep_others and os.path.exists(os.path.join(common.RESULTS, "leads.json")):
        with open(os.path.join(common.RESULTS, "leads.json"), encoding="utf-8") as fh:
            kept = json.load(fh)
        ran_standalone = bool(doc.get("spark_standalone"))
        for section, value in kept.items():
            if section not in doc:
                doc[section] = value
        for target, met in kept.get("targets", {}).items():
            if target.startswith("Spark") and not ran_standalone:
                doc["targets"][target] = met  # from the kept Spark section
    print("written", common.write_results("leads.json", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
