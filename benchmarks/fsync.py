"""What `redis_appendfsync` costs: settlements per second and latency through the real path (gRPC
server in process, POS clients in threads) with the embedded Redis's AOF fsync policy set to
always, everysec and no. docs/security.md quotes the result (benchmarks/results/fsync.json).

    python benchmarks/fsync.py [--settlements 3000] [--threads 8] [--lines 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cn20_codes, load_issuance, machine, write_results  # noqa: E402

from tracecode.clients.pos import PosClient, line  # noqa: E402
from tracecode.server.app import Server, make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.store import RedisProcess, free_port  # noqa: E402


def run(policy: str, n: int, threads: int, lines: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"tracecode-fsync-{policy}-") as tmp:
        redis = RedisProcess(tmp, port=free_port(), appendfsync=policy).start()
        cfg = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix="fs", threads=threads * 2)
        store = make_store(cfg, redis.url)
        server = Server(cfg, store).start()
        try:
            codes = cn20_codes(n * lines, seed=seed)
            load_issuance(store, codes)
            plans = [codes[i * lines:(i + 1) * lines] for i in range(n)]
            latencies: list[float] = []
            lock = threading.Lock()

            def worker(part):
                mine = []
                with PosClient(f"127.0.0.1:{server.port}", deadline_s=10, retries=0) as pos:
                    for cs in part:
                        t = time.perf_counter()
                        resp = pos.verify("BENCH", [line(c, "8123456") for c in cs])
                        mine.append(time.perf_counter() - t)
                        assert resp.recorded
                with lock:
                    latencies.extend(mine)

            parts = [plans[i::threads] for i in range(threads)]
            ts = [threading.Thread(target=worker, args=(p,)) for p in parts]
            start = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            elapsed = time.perf_counter() - start
        finally:
            server.stop(0)
            store.close()
            redis.stop()
    latencies.sort()
    return {"appendfsync": policy, "settlements": n, "seconds": round(elapsed, 2),
            "settlements_per_s": round(n / elapsed), "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settlements", type=int, default=3000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--lines", type=int, default=5)
    args = p.parse_args()
    rows = [run(policy, args.settlements, args.threads, args.lines, seed=i + 1)
            for i, policy in enumerate(("always", "everysec", "no"))]
    for r in rows:
        print(r)
    doc = {"what": "settlements/s and latency through gRPC + Lua with the AOF fsync policy varied",
           "threads": args.threads, "lines_per_settlement": args.lines, "machine": machine(), "results": rows}
    print("written", write_results("fsync.json", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
