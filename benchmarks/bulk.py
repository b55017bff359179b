"""Bulk re-verification end to end vs the Redis ceiling for the same Redis work, in one run.

    python benchmarks/bulk.py [--records 1000000]

Generates issuance records and a settlement export (CSV, ~2 lines per settlement, ~2 % resold
packs), runs `tracecode reverify` (a separate process, as operators run it) against a
`tracecode serve` process, and measures records/s and the CLI's peak memory; then pipelines the
same REPLAY verify.lua calls straight at Redis (no gRPC, no per-record Python) for the ceiling.
Writes benchmarks/results/bulk.json.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tracecode.server.store.types import SettlementCall  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.store.keys import KeySpace  # noqa: E402
from tracecode.server.verifier import Line, Verifier  # noqa: E402

CST = timezone(timedelta(hours=8))


def generate(path: str, codes: list[str], records: int, seed: int = 3) -> list[tuple]:
    """Write the export; return the settlements (for the ceiling's identical calls)."""
    rnd = random.Random(seed)
    t = datetime(2024, 5, 1, 8, 0, tzinfo=CST)
    settlements = []
    used: list[str] = []
    nxt = 0
    written = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units", "insured_id"])
        n = 0
        while written < records:
            n += 1
            t += timedelta(milliseconds=rnd.randint(50, 400))
            site = f"S{rnd.randrange(5000):05d}"
            k = min(rnd.choice((1, 1, 2, 2, 3, 4)), records - written)
            lines = []
            for _ in range(k):
                if used and rnd.random() < 0.02:
                    code = rnd.choice(used)  # a resold pack
                else:
                    code = codes[nxt]
                    nxt += 1
                    used.append(code)
                lines.append(code)
            sid = f"T{n:08d}"
            for ln, code in enumerate(lines, 1):
                w.writerow([site, sid, t.isoformat(), ln, code, "8123456", "", f"h{n:x}"])
            settlements.append((site, sid, int(t.timestamp() * 1000), lines))
            written += k
    return settlements


def redis_cpu(store) -> float:
    info = store.r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--ceiling-settlements", type=int, default=100_000)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="tracecode-bench-bulk-")
    rp = common.start_redis()
    config = Config(listen="127.0.0.1:0", metrics_port=0)
    store = make_store(config, rp.url)
    server = None
    try:
        codes = common.cn20_codes(args.records + 1000)
        load_s = common.load_issuance(store, codes)
        export = os.path.join(tmp, "export.csv")
        t0 = time.perf_counter()
        settlements = generate(export, codes, args.records)
        gen_s = time.perf_counter() - t0
        print(f"issuance {len(codes):,} codes loaded in {load_s:.1f} s; export of {args.records:,} records "
              f"({len(settlements):,} settlements, {os.path.getsize(export) / 1e6:.0f} MB) in {gen_s:.1f} s", flush=True)

        # Ceiling: the very calls the server makes for these settlements, sent as its job sends them.
        verifier = Verifier(store, config)
        sub = settlements[: args.ceiling_settlements]
        ceiling_keys = KeySpace("tc-job-ceiling")
        calls = []
        for site, sid, at, codes_ in sub:
            lines = [Line(c, "8123456") for c in codes_]
            plan, distinct, _ = verifier.plan_lines(lines)
            calls.append(SettlementCall(dispense=True, site=site, settlement_id=sid, settled_at_ms=at,
                              settle_day=verifier.settle_day(at), all_or_nothing=False, lines=plan,
                              codes=distinct, state=ceiling_keys, state_ttl_s=86400,
                              digest=verifier.digest(site, sid, at, False, lines)))
        ceil_records = sum(len(s[3]) for s in sub)
        ceil_s = common.replay_ceiling(store, calls)  # the job's own calls, sent as the job sends them
        ceiling_rps = ceil_records / ceil_s
        print(f"ceiling: {ceil_records:,} records in {ceil_s:.2f} s = {ceiling_rps:,.0f} records/s", flush=True)
        store.drop_namespace(ceiling_keys)

        server, port = common.start_serve(rp.url)
        out = os.path.join(tmp, "report")
        redis_cpu0 = redis_cpu(store)
        server_cpu0 = common.tree_cpu(server.pid)  # supervisor + workers
        t0 = time.perf_counter()
        cli = subprocess.Popen([common.python(), "-m", "tracecode.cli", "reverify", export, "--server",
                                f"127.0.0.1:{port}", "--out", out, "--job-id", "bench", "--quiet"],
                               stdout=subprocess.PIPE, text=True)
        # Peak RSS from /proc (VmHWM of the exec'd CLI), polled until it exits: wait4's ru_maxrss
        # would also count the pages the child shared with this (large) process before exec.
        hwm = [0.0]
        exited = threading.Event()

        def watch():
            while not exited.wait(0.2):
                hwm[0] = max(hwm[0], common.vm_hwm_mb(cli.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(cli.pid, 0)
        exited.set()
        elapsed = time.perf_counter() - t0
        cli.returncode = os.waitstatus_to_exitcode(status)
        summary_line = cli.stdout.read().strip()
        if cli.returncode != 0:
            raise SystemExit(f"reverify failed ({cli.returncode})")
        rps = args.records / elapsed
        peak_mb = hwm[0]
        # Where the two cores went: the CLI, the server, Redis (CPU seconds during the job).
        cpu = {"cli": round(usage.ru_utime + usage.ru_stime, 2),
               "server": round(common.tree_cpu(server.pid) - server_cpu0, 2),
               "redis": round(redis_cpu(store) - redis_cpu0, 2)}
        print(f"CPU seconds during the job: {cpu} over {elapsed:.1f} s wall", flush=True)
        print(f"tracecode reverify: {args.records:,} records in {elapsed:.1f} s = {rps:,.0f} records/s; "
              f"peak RSS {peak_mb:.0f} MB; {summary_line}", flush=True)
        doc = {
            "benchmark": "bulk re-verification (REPLAY) end to end",
            "command": "python benchmarks/bulk.py --records %d" % args.records,
            "machine": common.machine(),
            "records": args.records, "settlements": len(settlements),
            "seconds": round(elapsed, 2), "records_per_s": round(rps),
            "ceiling": {"records": ceil_records, "seconds": round(ceil_s, 3), "records_per_s": round(ceiling_rps),
                        "how": "the same verify.lua REPLAY calls, pre-encoded, pipelined 64 deep on one socket"},
            "ratio_to_ceiling": round(rps / ceiling_rps, 3),
            "cli_peak_rss_mb": round(peak_mb, 1),
            "cpu_seconds": cpu,
            "summary": summary_line,
        }
        print(f"ratio to ceiling: {doc['ratio_to_ceiling']:.2f}; written {common.write_results('bulk.json', doc)}")
        return 0
    finally:
        common.stop_all(server, store, rp)


if __name__ == "__main__":
    sys.exit(main())
