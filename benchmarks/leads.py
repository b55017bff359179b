"""The leads engine at 1M, 3M and 10M lines against the bulk REPLAY path on the same 1M lines.

    python benchmarks/leads.py [--sizes 1,3,10] [--data DIR] [--no-replay] [--no-spark]

Generates a history of monthly settlement exports (Parquet, 1M lines each: packs scanned as
20-digit codes and as GS1 strings, ~1 % resold, swaps, expired, blocked, unknown, malformed
codes, split packs) with their issuance files and a site registry; the 1M / 3M / 10M runs read
the first 1 / 3 / 10 months. Each run is `tracecode leads` in its own process (wall time end to
end: read, canonicalise, every model, write; peak RSS from /proc VmHWM). The same 1M lines go
through `tracecode load` + `tracecode reverify --mode replay` against `tracecode serve` on a fresh
Redis (load not timed), and through `tracecode leads --engine spark` (local[2]).
Writes benchmarks/results/leads.json.
"""
from __future__ import annotations

import argparse
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

from tracecode import codec  # noqa: E402
from tracecode.leads.synth import CST  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.pseudonym import generate_key_file  # noqa: E402

MONTH_LINES = 1_000_000
N_SITES = 4000
N_PEOPLE = 1_500_000


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
        person = f"{rnd.randrange(N_PEOPLE):018d}"
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


def vm_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def timed(cmd: list[str], watch_tree: bool = True) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB (with watch_tree: the peak of the sum over the process and
    its children, sampled every 0.1 s, e.g. the staging workers or Spark's JVM; else the process's
    VmHWM), stdout. Its CPU seconds (children included) go to CPU["last"]."""
    import resource
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm = [0.0]
    done = threading.Event()

    def watch():
        while not done.wait(0.1):
            if watch_tree:
                hwm[0] = max(hwm[0], sum(vm_rss_mb(p) for p in common.process_tree(proc.pid)),
                             common.vm_hwm_mb(proc.pid))
            else:
                hwm[0] = max(hwm[0], common.vm_hwm_mb(proc.pid))
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


def leads_cmd(files, issuance, sites, out, key, engine="duckdb") -> list[str]:
    return [common.python(), "-m", "tracecode.clients.cli", "leads", *files, "--issuance", *issuance,
            "--sites", sites, "--out", out, "--pseudonym-key", key, "--engine", engine, "--quiet"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,3,10", help="millions of lines (months of 1M)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tracecode-bench-leads"))
    ap.add_argument("--no-replay", action="store_true")
    ap.add_argument("--no-spark", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.data, exist_ok=True)
    t0 = time.perf_counter()
    months = [generate_month(args.data, k) for k in range(max(sizes))]
    print(f"data: {max(sizes)} month(s) of {MONTH_LINES:,} lines in {args.data} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    sites = sites_file(args.data)
    key = os.path.join(args.data, "pseudonym.key")
    if not os.path.exists(key):
        generate_key_file(key)
    work = tempfile.mkdtemp(prefix="tracecode-bench-leads-run-")
    doc = {"benchmark": "leads engine end to end (read, canonicalise, verdicts, all models, write)",
           "command": "python benchmarks/leads.py --sizes " + args.sizes, "machine": common.machine(),
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
                                  "peak_rss_how": "sum over the process tree (staging workers included)",
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

    if not args.no_spark:
        out = os.path.join(work, "spark-1M")
        secs, rss, line = timed(leads_cmd([months[0][0]], [months[0][1]], sites, out, key, "spark"))
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        same = all(open(os.path.join(out, f), "rb").read() == open(os.path.join(work, "duck-1M", f), "rb").read()
                   for f in ("leads.csv", "evidence.csv")) if base else None
        doc["spark_local_1M"] = {"master": "local[2]", "seconds": round(secs, 2), "cpu_seconds": CPU["last"],
                                 "lines_per_s": round(summary["lines"] / secs), "peak_rss_mb": round(rss),
                                 "stages_s": summary["seconds"], "leads_identical_to_duckdb": same}
        print(f"spark local 1M: {secs:.1f} s; identical leads: {same}", flush=True)

    if not args.no_replay and base:
        rp = common.start_redis()
        store = make_store(Config(listen="127.0.0.1:0", metrics_port=0), rp.url)
        server = None
        try:
            server, port = common.start_serve(rp.url)
            target = f"127.0.0.1:{port}"
            load_s, _, load_line = timed([common.python(), "-m", "tracecode.clients.cli", "load", months[0][1],
                                          "--server", target])
            print(f"issuance loaded in {load_s:.0f} s ({load_line})", flush=True)
            out = os.path.join(work, "replay-1M")
            secs, rss, line = timed([common.python(), "-m", "tracecode.clients.cli", "reverify", months[0][0],
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
        "10M end to end < 120 s": bool(big) and big["seconds"] < 120,
        "10M peak RSS < 2 GB": bool(big) and big["peak_rss_mb"] < 2048,
        "3M and 10M within 1.3x of linear": all(v <= 1.3 for v in doc.get("growth", {}).values()) and
        {"3M", "10M"} <= set(doc.get("growth", {})),
    }
    print(json.dumps(doc["targets"], indent=1))
    print("written", common.write_results("leads.json", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
