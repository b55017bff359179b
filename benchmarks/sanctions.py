"""The POS path with 10,000 site sanctions and 100,000 person sanctions loaded, against the same
path without any, in one run (issue 16): throughput (closed loop) and p99 (open loop at half of
the unsanctioned max), 5-line settlements carrying insured ids, measured alternately on two
`tracecode serve` processes over one Redis (key prefixes tcA: no sanctions, tcB: the 110,000).

    python benchmarks/sanctions.py [--reps 3] [--max-seconds 5] [--latency-seconds 10]

Writes benchmarks/results/sanctions.json. None of the traffic is refused (a refused settlement is
another, cheaper path): the traffic's 997 sites each carry a sanction that starts in 2099, which
the gate must read and judge on every call; the 9,003 other site sanctions and the 100,000 person
sanctions bind other sites and persons. Also recorded, for the cluster design (docs/scaling.md):
the Redis memory one copy of the sanction indexes takes (what a copy per code bucket would
multiply by 1,024), the servers' RSS with and without the 110,000 entries in their views, and
how long a view takes to load them.

Reuses run.py's load-generator driver (Bench) and code pool.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
import run as runbench  # noqa: E402

from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file  # noqa: E402
from tracecode.server.store.sanctions import SanctionStore  # noqa: E402
from tracecode.server.sanctions import SetRequest  # noqa: E402
from tracecode.server.store import Store, now_ms  # noqa: E402

LINES = 5
SITES, PERSONS = 10_000, 100_000
TRAFFIC_SITES = 997  # loadgen.build: site S{n % 997:05d}
INSURED = 5_000  # distinct insured ids in the traffic (loadgen --insured)
FAR = 4_070_908_800_000  # 2099-01-01


def sanction_requests(pseudonym) -> list[SetRequest]:
    reqs = []
    for k in range(SITES):
        traffic = k < TRAFFIC_SITES
        site = f"S{k:05d}" if traffic else f"SANCT-S-{k:05d}"
        reqs.append(SetRequest(f"bench-s-{k}", "SUSPEND_SERVICE", "SITE", site, FAR if traffic else None,
                               0, "benchmark", f"LEAD-{k}", "bench"))
    for k in range(PERSONS):
        reqs.append(SetRequest(f"bench-p-{k}", "SUSPEND_CARD", "INSURED", pseudonym(f"SANCT-P-{k:06d}"),
                               None, 0, "benchmark", f"CASE-{k}", "bench"))
    return reqs


def index_memory(store: Store) -> dict:
    """Bytes Redis holds for the sanction keys of one prefix (MEMORY USAGE, sampled fully)."""
    total, indexes, n = 0, 0, 0
    for key in store.r.scan_iter(match=f"{store.keys.prefix}:*:x:*", count=5000):
        size = store.r.memory_usage(key, samples=0) or 0
        total += size
        n += 1
        if ":x:site:" in key or ":x:ins:" in key:
            indexes += size
    return {"keys": n, "bytes_total": total, "bytes_subject_indexes": indexes}


def rss_mb(pid: int) -> float:
    total = 0
    for p in common.process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(row.split()[1]) for row in fh if row.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=5.0)
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--codes", type=int, default=1_500_000)
    ap.add_argument("--out", default="sanctions.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["TRACECODE_LOADGEN_INSURED"] = str(INSURED)  # inherited by the load generators

    tmp = tempfile.mkdtemp(prefix="tracecode-bench-sanctions-")
    key_file = generate_key_file(os.path.join(tmp, "pseudonym.key"))
    pseudonym = Pseudonymizer.from_file(key_file).pseudonym
    rp = common.start_redis(unix_socket=True, auto_rewrite=False)
    servers = {}
    doc = {"benchmark": "POS path with 10,000 site + 100,000 person sanctions vs none, same run",
           "command": "python benchmarks/sanctions.py " + " ".join(sys.argv[1:]), "machine": common.machine(),
           "busy_cores_before": runbench.system_busy(1.0), "lines": LINES, "insured_ids_in_traffic": INSURED}
    stores = {}
    try:
        for name in ("tcA", "tcB"):
            stores[name] = make_store(Config(metrics_port=0, key_prefix=name, pseudonym_key_file=key_file), rp.url)
        # Both prefixes get the same issued codes (one pool; each code is dispensed once overall).
        pool = runbench.CodePool(stores["tcA"], args.codes)
        pool.ensure(400_000)
        common.load_issuance(stores["tcB"], pool.codes[:pool.loaded], runbench.PRODUCT)
        loaded_b = pool.loaded

        t0 = time.monotonic()
        new = SanctionStore(stores["tcB"]).set_many(sanction_requests(pseudonym), now_ms=now_ms())
        doc["sanctions"] = {"site": SITES, "person": PERSONS, "stored": new,
                            "load_seconds": round(time.monotonic() - t0, 1),
                            "redis_memory_one_copy": index_memory(stores["tcB"])}
        runbench.log(f"{new:,} sanctions stored in {doc['sanctions']['load_seconds']} s; "
                     f"{doc['sanctions']['redis_memory_one_copy']}")

        for name in ("tcA", "tcB"):
            argv = [common.python(), "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0",
                    "--redis-url", common.unix_url(rp), "--metrics-port", str(common.free_port()),
                    "--log-level", "WARNING", "--key-prefix", name, "--pseudonym-key-file", key_file]
            t0 = time.monotonic()
            proc, port = runbench.start_process(argv, "tracecode listening on port ", os.path.join(tmp, f"{name}.log"))
            servers[name] = (proc, port, round(time.monotonic() - t0, 2))
        time.sleep(1.0)
        doc["servers"] = {n: {"start_seconds": s, "rss_mb": rss_mb(p.pid)} for n, (p, _, s) in servers.items()}
        runbench.log(f"servers: {doc['servers']}")

        class Pool:
            """Codes for both servers: tcB's issuance follows tcA's as the pool grows."""
            def __init__(self, inner):
                self.inner, self.b_loaded = inner, loaded_b

            def take(self, n):
                out = self.inner.take(n)
                if self.inner.loaded > self.b_loaded:
                    common.load_issuance(stores["tcB"], self.inner.codes[self.b_loaded:self.inner.loaded],
                                         runbench.PRODUCT)
                    self.b_loaded = self.inner.loaded
                return out

            def give_back(self, codes):
                self.inner.give_back(codes)

        bench = runbench.Bench(args, tmp, Pool(pool), rp.proc.pid)
        for proc, port, _ in servers.values():  # warm-up, not reported
            bench.drive(port, proc.pid, LINES, closed=args.concurrency, duration=1.5, max_settlements=4000)

        runs = {"tcA": [], "tcB": []}
        for _ in range(args.reps):
            for name, (proc, port, _) in servers.items():
                res = bench.drive(port, proc.pid, LINES, closed=args.concurrency, duration=args.max_seconds,
                                  max_settlements=int(6000 * args.max_seconds))
                runs[name].append(res)
                runbench.log(f"  max {name}: {runbench.fmt(res)}")
        maxes = {n: statistics.median(r["settlements_per_s"] for r in rs) for n, rs in runs.items()}
        rate = maxes["tcA"] * 0.5
        lat = {"tcA": [], "tcB": []}
        for _ in range(args.reps):
            for name, (proc, port, _) in servers.items():
                res = bench.drive(port, proc.pid, LINES, rate=rate, duration=args.latency_seconds,
                                  max_settlements=int(rate * args.latency_seconds) + 100)
                lat[name].append(res)
                runbench.log(f"  open {name} at {rate:.0f}/s: {runbench.fmt(res)}")
        p99 = {n: statistics.median(r["latency_ms"]["p99"] for r in rs) for n, rs in lat.items()}
        refused = {n: sum(r["errors"].get("FAILED_PRECONDITION", 0) for r in runs[n] + lat[n]) for n in runs}
        doc["result"] = {
            "max_settlements_per_s": {"without": maxes["tcA"], "with": maxes["tcB"],
                                      "ratio": round(maxes["tcB"] / maxes["tcA"], 3)},
            "p99_ms_at_half_max": {"offered_per_s": round(rate, 1), "without": p99["tcA"], "with": p99["tcB"],
                                   "ratio": round(p99["tcB"] / p99["tcA"], 3)},
            "refused": refused,
            "runs": {"max": {n: [r["settlements_per_s"] for r in rs] for n, rs in runs.items()},
                     "p99_ms": {n: [r["latency_ms"]["p99"] for r in rs] for n, rs in lat.items()}}}
        doc["raw"] = {"max": runs, "open_loop": lat}
        doc["servers_after"] = {n: {"rss_mb": rss_mb(p.pid)} for n, (p, _, _) in servers.items()}
        path = common.write_results(args.out, doc)
        runbench.log(f"result: {doc['result']['max_settlements_per_s']} {doc['result']['p99_ms_at_half_max']}; {path}")
    finally:
        for proc, _, _ in servers.values():
            runbench.stop_process(proc)
        for s in stores.values():
            s.close()
        rp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
