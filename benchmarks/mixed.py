"""POS latency while a bulk re-verification job runs on the same server, in one run.

    python benchmarks/mixed.py [--rate 450] [--seconds 12] [--reps 2]

A regulator's job and the pharmacies' settlements meet on one `tracecode serve` (2 workers) and
one Redis. The load generator sends 5-line settlements open loop at --rate (latency counted from
each call's due time), first alone, then beside a `tracecode reverify` REPLAY job at full speed
and beside one capped with --max-rate; the phases alternate --reps times. Per phase also the
job's own pace (records/s, from the server's metrics). Last, the job alone (records/s). Writes benchmarks/results/mixed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bulk import generate  # noqa: E402

from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.store import free_port  # noqa: E402

POS_CODES = 300_000  # fresh packs for the load generator (5 per settlement)
JOB_RECORDS = 300_000  # long enough to outlast a phase at full speed beside POS traffic


def job_records(metrics_port: int) -> float:
    """Records (settlement lines) bulk jobs have processed so far (all workers), from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "tracecode_bulk_records"
               for s in f.samples if s.name == "tracecode_bulk_records_total")


def percentiles(latencies_s: list[float]) -> dict:
    lat = sorted(latencies_s)
    at = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2)  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p999": at(0.999), "max": round(lat[-1] * 1000, 2)}


class Run:
    def __init__(self, args, tmp: str, port: int, metrics_port: int, pos_file: str, export: str):
        self.args, self.tmp, self.port, self.pos_file, self.export = args, tmp, port, pos_file, export
        self.metrics_port = metrics_port
        self.first = 0  # next unused line of pos_file
        self.jobs = 0

    def job(self, export: str, max_rate: float = 0) -> subprocess.Popen:
        self.jobs += 1
        extra = ["--max-rate", str(max_rate)] if max_rate else []
        return subprocess.Popen([common.python(), "-m", "tracecode.cli", "reverify", export, "--server",
                                 f"127.0.0.1:{self.port}", "--out", os.path.join(self.tmp, f"report{self.jobs}"),
                                 "--job-id", f"mixed{self.jobs}", "--quiet", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pos(self, name: str, max_rate: float | None = None) -> dict:
        """One phase: POS load for --seconds, beside a job when max_rate is not None (0: uncapped)."""
        job = None
        if max_rate is not None:
            job = self.job(self.export, max_rate)
            time.sleep(2)  # the job under way before the first settlement
        n = int(self.args.rate * self.args.seconds) + 10
        done0, t0 = job_records(self.metrics_port), time.perf_counter()
        out = subprocess.run([common.python(), os.path.join(os.path.dirname(__file__), "loadgen.py"),
                              "--target", f"127.0.0.1:{self.port}", "--codes", self.pos_file,
                              "--first", str(self.first), "--settlements", str(n), "--lines", "5",
                              "--rate", str(self.args.rate), "--duration", str(self.args.seconds),
                              "--channels", "32"], capture_output=True, text=True, check=True)
        job_rate = (job_records(self.metrics_port) - done0) / (time.perf_counter() - t0)
        self.first += n * 5
        d = json.loads(out.stdout.strip().splitlines()[-1])
        res = {"phase": name, "completed": d["completed"], "errors": d["errors"],
               "latency_ms": percentiles(d["latencies_s"])}
        if job:
            res["job_records_per_s"] = round(job_rate)
            res["job_outlasted_phase"] = job.poll() is None
            job.kill()
            job.wait()
        common_line = " ".join(f"{k} {v}" for k, v in res["latency_ms"].items())
        beside = f"; job {job_rate:,.0f} records/s" if job else ""
        print(f"{name:28s} {d['completed']} settlements, errors {d['errors']}: {common_line} ms{beside}", flush=True)
        time.sleep(2)
        return res

    def job_alone(self, export: str, records: int) -> dict:
        t0 = time.perf_counter()
        proc = self.job(export)
        proc.wait()
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"reverify failed ({proc.returncode})")
        print(f"{'job alone':28s} {records:,} records in {elapsed:.1f} s = {records / elapsed:,.0f} records/s",
              flush=True)
        return {"records": records, "seconds": round(elapsed, 2), "records_per_s": round(records / elapsed)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=450, help="POS settlements/s (5 lines), open loop")
    ap.add_argument("--seconds", type=float, default=12, help="per phase")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--capped-rate", type=float, default=1000, help="the capped job's --max-rate (settlements/s)")
    ap.add_argument("--out", default="mixed.json")
    args = ap.parse_args()
    if args.rate * args.seconds * 5 * (2 * args.reps + 2) > POS_CODES:
        raise SystemExit("mixed: --rate x --seconds needs more fresh codes than POS_CODES")

    tmp = tempfile.mkdtemp(prefix="tracecode-bench-mixed-")
    rp = common.start_redis(unix_socket=True, auto_rewrite=False)  # no AOF rewrite fork mid-phase
    url = common.unix_url(rp)
    store = make_store(Config(), url)
    server = None
    try:
        codes = common.cn20_codes(POS_CODES + 360_000, seed=7)
        common.load_issuance(store, codes)
        pos_file = os.path.join(tmp, "pos.txt")
        with open(pos_file, "w", encoding="ascii") as fh:
            fh.write("\n".join(codes[:POS_CODES]) + "\n")
        export = os.path.join(tmp, "export.csv")
        generate(export, codes[POS_CODES:], JOB_RECORDS)
        alone_export = os.path.join(tmp, "alone.csv")
        alone_records = 150_000
        generate(alone_export, codes[POS_CODES:], alone_records)
        metrics_port = free_port()
        server, port = common.start_serve(url, metrics_port, log_level="ERROR")
        run = Run(args, tmp, port, metrics_port, pos_file, export)
        phases = [run.pos("POS alone")]
        for _ in range(args.reps):
            phases.append(run.pos("POS + job at full speed", 0))
            phases.append(run.pos(f"POS + job at {args.capped_rate:g}/s", args.capped_rate))
        phases.append(run.pos("POS alone"))
        job = run.job_alone(alone_export, alone_records)
        doc = {
            "benchmark": "POS latency beside a bulk REPLAY job on the same server and Redis",
            "command": "python benchmarks/mixed.py " + " ".join(sys.argv[1:]),
            "machine": common.machine(),
            "pos": {"rate_per_s": args.rate, "lines": 5, "seconds_per_phase": args.seconds},
            "job": {"records": JOB_RECORDS, "chunk": "reverify default (500 settlements)"},
            "phases": phases,
            "job_alone": job,
        }
        print(f"written {common.write_results(args.out, doc)}")
        return 0
    finally:
        common.stop_all(server, store, rp)


if __name__ == "__main__":
    sys.exit(main())
