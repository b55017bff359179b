"""POS latency over Redis layout 1 against layout 2, interleaved in one run.

    python benchmarks/layout_latency.py [--rate 700] [--rounds 3] [--seconds 15]

Each round, per layout: a fresh redis-server (AOF everysec, unix socket, as run.py), codes issued
in that layout, `tracecode serve` (defaults) started with TRACECODE_STORE_LAYOUT set to it, and
the run.py load generator in an open loop of 5-line settlements at --rate for --seconds (latency
from each request's due time). The layouts alternate round by round, so the VM's drift and other
users' load fall on both alike; single p99s on this machine move by 2x between rounds, so compare
the rounds' spread, not one pair. Writes benchmarks/results/layout_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LINES = 5


def one_round(layout: int, rate: float, seconds: float) -> dict:
    n = int(rate * seconds * LINES * 1.2)
    os.environ["TRACECODE_STORE_LAYOUT"] = str(layout)  # inherited by `tracecode serve`
    rp = common.start_redis(unix_socket=True, auto_rewrite=False)
    store = make_store(Config(metrics_port=0, store_layout=layout), rp.url)
    server = None
    try:
        codes = common.cn20_codes(n)
        for i in range(0, n, 2000):
            store.upsert_issuance([(c, "8123456", "", "B2401", 20271231, 1, "Demo Pharma Co., Ltd.", "")
                                   for c in codes[i:i + 2000]], replace=False)
        server, port = common.start_serve(rp.url)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write("\n".join(codes) + "\n")
        gen = subprocess.Popen([common.python(), os.path.join(HERE, "loadgen.py"), "--target", f"127.0.0.1:{port}",
                                "--codes", fh.name, "--settlements", str(n // LINES), "--lines", str(LINES),
                                "--duration", str(seconds), "--channels", "32", "--rate", str(rate)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if gen.stdout.readline().strip() != "ready":
            raise SystemExit(f"load generator failed to start ({gen.wait()})")
        gen.stdin.write("go\n")
        gen.stdin.flush()
        out = json.loads(gen.stdout.readline())
        gen.wait(30)
        os.unlink(fh.name)
        lat = sorted(out["latencies_s"])
        k = len(lat)
        return {"layout": layout, "calls": k, "verdicts": out["verdicts"], "errors": out["errors"],
                "p50_ms": round(lat[k // 2] * 1000, 2), "p99_ms": round(lat[int(k * 0.99)] * 1000, 2),
                "p999_ms": round(lat[int(k * 0.999)] * 1000, 2)}
    finally:
        common.stop_all(server, store, rp)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=700.0, help="5-line settlements per second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    rounds = []
    for _ in range(args.rounds):
        for layout in (1, 2):
            r = one_round(layout, args.rate, args.seconds)
            rounds.append(r)
            print(r, flush=True)
    doc = {"benchmark": "POS latency, layout 1 vs layout 2, interleaved",
           "command": f"python benchmarks/layout_latency.py --rate {args.rate:g} --rounds {args.rounds} "
                      f"--seconds {args.seconds:g}",
           "machine": common.machine(), "rounds": rounds,
           "p99_ms_by_layout": {str(lay): [r["p99_ms"] for r in rounds if r["layout"] == lay] for lay in (1, 2)}}
    print(common.write_results("layout_latency.json", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
