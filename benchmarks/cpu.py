"""Server CPU per settlement against the gRPC echo server's CPU per call, in one short run, and
optionally a py-spy profile of one tracecode worker under that load (docs/performance.md,
"Settlement CPU: profile before and after").

    python benchmarks/cpu.py                          # ~1 minute: tracecode, then echo, 5 lines
    python benchmarks/cpu.py --profile /tmp/prof      # + py-spy (GIL samples) of worker 1

The same pieces as benchmarks/run.py (its CodePool, Bench, processes; a fresh Redis with AOF
everysec; `tracecode serve` with metrics on, default workers): closed loop at --concurrency,
--seconds per run, --reps runs each of tracecode and echo alternately (the machine's speed
drifts), median kept. CPU per settlement = the server's process tree's CPU seconds over the
settlements it answered; the echo (benchmarks/naive_server.py --echo, as many processes as
tracecode has workers) is measured the same way. run.py's own figure is the same ratio
(`cpu_per_call_ms` in its results) over its longer runs.

With --profile DIR, py-spy records worker 1 during one extra tracecode run (--gil: only samples
holding the GIL, i.e. Python work that competes for the worker's one interpreter; --idle off)
and writes DIR/raw.txt (collapsed stacks) and DIR/top.txt (self and total shares by function
and by module). The profiled run's CPU figures are not used (py-spy takes CPU of its own).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import run  # noqa: E402

from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402


def cpu_ms_per_call(res: dict) -> float:
    return round(res["cpu_cores"]["server"] / max(res["settlements_per_s"], 1e-9) * 1e3, 4)


def _module(frame: str) -> str:
    """'func (grpc/_server.py:12)' -> 'grpc/_server.py': py-spy names files relative to their
    sys.path entry, so tracecode's are server/..., ext/... and a library's start with its package."""
    return frame.rsplit("(", 1)[-1].rsplit(":", 1)[0]


# Where a sample's own frame is, by file prefix (first match wins): the table of
# docs/performance.md's profile section.
GROUPS = (
    ("tracecode: servicer, convert, status", ("server/api/servicer.py", "server/api/convert.py", "server/api/status.py",
                                              "server/priority.py")),
    ("tracecode: interceptors, auth", ("server/api/interceptors.py", "server/api/auth.py", "server/logs.py")),
    ("tracecode: verifier", ("server/verifier.py", "server/sanction", "ext/")),
    ("tracecode: store", ("server/store/",)),
    ("tracecode: metrics + prometheus_client", ("server/metrics.py", "prometheus_client/")),
    ("redis-py + hiredis", ("redis/", "hiredis")),
    ("json", ("json/",)),
    ("grpc (server, interceptor pipeline)", ("grpc/",)),
    ("thread pool and locks (threading, concurrent.futures)", ("threading.py", "concurrent/", "queue.py")),
    ("contextlib", ("contextlib.py",)),
)


def _group(path: str) -> str:
    for name, prefixes in GROUPS:
        if path.startswith(prefixes):
            return name
    return "other"


def summarise_profile(raw_path: str, top_path: str, n: int = 40) -> dict:
    """Self and total shares of the samples, by function and by module, from collapsed stacks."""
    selfs: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    mod_self: collections.Counter = collections.Counter()
    mod_total: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    samples = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            c = int(count)
            samples += c
            frames = [f for f in stack.split(";") if f]
            # py-spy's thread root frame ("process ..." / "thread ...") is not code.
            frames = [f for f in frames if "(" in f]
            if not frames:
                continue
            selfs[frames[-1]] += c
            mod_self[_module(frames[-1])] += c
            groups[_group(_module(frames[-1]))] += c
            for f in set(frames):
                totals[f] += c
            for m in {_module(f) for f in frames}:
                mod_total[m] += c
    out = {"samples": samples,
           "by_group_self": {g: round(v / samples, 4) for g, v in groups.most_common()},
           "by_module_self": {m: round(v / samples, 4) for m, v in mod_self.most_common()},
           "by_module_total": {m: round(v / samples, 4) for m, v in mod_total.most_common()},
           "by_function_self": {f: round(v / samples, 4) for f, v in selfs.most_common(n)},
           "by_function_total": {f: round(v / samples, 4) for f, v in totals.most_common(n)}}
    with open(top_path, "w") as fh:
        fh.write(f"{samples} GIL samples\n")
        for title in ("by_group_self", "by_module_self", "by_module_total", "by_function_self", "by_function_total"):
            fh.write(f"\n== {title}\n")
            for k, v in out[title].items():
                fh.write(f"{v * 100:6.1f} %  {k}\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-echo", action="store_true", help="tracecode only")
    ap.add_argument("--profile", default="", help="directory: py-spy record of worker 1 during one more run")
    ap.add_argument("--profile-seconds", type=float, default=15.0)
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (it falls behind above ~150)")
    ap.add_argument("--profile-all", action="store_true", help="every non-idle sample, not only GIL holders")
    ap.add_argument("--nonblocking", action="store_true", help="py-spy --nonblocking (fewer usable samples)")
    ap.add_argument("--out", default="", help="results file name in benchmarks/results (default: none)")
    ap.add_argument("--summarise", default="", help="only summarise DIR/raw.txt of an earlier --profile")
    args = ap.parse_args()
    if args.summarise:
        summarise_profile(os.path.join(args.summarise, "raw.txt"), os.path.join(args.summarise, "top.txt"))
        print(open(os.path.join(args.summarise, "top.txt")).read()[:3000])
        return 0

    tmp = tempfile.mkdtemp(prefix="tracecode-cpu-")
    rp = common.start_redis(unix_socket=True, auto_rewrite=False)
    config = Config(listen="127.0.0.1:0", metrics_port=0)
    store = make_store(config, rp.url)
    pool = run.CodePool(store, 400_000)
    server = echo = None
    doc: dict = {"command": "python benchmarks/cpu.py " + " ".join(sys.argv[1:]), "machine": common.machine(),
                 "busy_cores_before": run.system_busy(1.0), "lines": args.lines}
    try:
        pool.ensure(200_000)
        bench = run.Bench(args, tmp, pool, rp.proc.pid)
        argv = [common.python(), "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0",
                "--redis-url", common.unix_url(rp), "--metrics-port", str(common.free_port()), "--log-level", "WARNING"]
        if args.workers is not None:
            argv += ["--workers", str(args.workers)]
        server, port = run.start_process(argv, "tracecode listening on port ", os.path.join(tmp, "serve.log"))
        time.sleep(0.5)
        procs = common.process_tree(server.pid)
        n_workers = max(len(procs) - 1, 1)
        echo, eport = run.start_process([common.python(), os.path.join(run.HERE, "naive_server.py"), "--echo",
                                         "--listen", "127.0.0.1:0", "--redis-url", common.unix_url(rp),
                                         "--processes", str(n_workers)],
                                        "naive listening on port ", os.path.join(tmp, "echo.log"))
        doc["server"] = {"processes": procs, "workers": n_workers}
        # Bounds a fast machine cannot reach; codes are issued before a timed run (CodePool.ensure),
        # never inside one (and never inside the profile's window).
        bound = int(5000 * args.seconds)
        bench.drive(port, server.pid, args.lines, closed=args.concurrency, duration=1.5, max_settlements=4000)
        bench.drive(eport, echo.pid, args.lines, closed=args.concurrency, duration=1.0, max_settlements=4000)
        runs: dict[str, list] = {"tracecode": [], "echo": []}
        for _ in range(args.reps):
            for name, p, proc in (("tracecode", port, server), ("echo", eport, echo)):
                if name == "echo" and args.no_echo:
                    continue
                pool.ensure(bound * args.lines)
                res = bench.drive(p, proc.pid, args.lines, closed=args.concurrency, duration=args.seconds,
                                  max_settlements=bound)
                res["cpu_per_call_ms"] = cpu_ms_per_call(res)
                runs[name].append(res)
                print(f"  {name:<9} {args.lines} lines: {run.fmt(res)}  cpu/call {res['cpu_per_call_ms']:.3f} ms",
                      flush=True)
        for name, rs in runs.items():
            if not rs:
                continue
            med = sorted(rs, key=lambda r: r["cpu_per_call_ms"])[len(rs) // 2]
            doc[name] = {"median": {k: med[k] for k in ("settlements_per_s", "codes_per_s", "cpu_cores",
                                                         "cpu_per_call_ms", "latency_ms")},
                         "runs_cpu_per_call_ms": [r["cpu_per_call_ms"] for r in rs],
                         "runs_settlements_per_s": [r["settlements_per_s"] for r in rs]}
        if runs["echo"]:
            t, e = doc["tracecode"]["median"]["cpu_per_call_ms"], doc["echo"]["median"]["cpu_per_call_ms"]
            doc["server_cpu_over_echo"] = round(t / e, 2)
            print(f"server CPU per {args.lines}-line settlement {t:.3f} ms; echo CPU per call {e:.3f} ms; "
                  f"ratio {t / e:.2f} (target <= 1.5)", flush=True)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            raw = os.path.join(args.profile, "raw.txt")
            worker = procs[1] if len(procs) > 1 else procs[0]
            profiled = int(5000 * args.profile_seconds)
            pool.ensure(profiled * args.lines)
            spy = subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--pid", str(worker),
                                    *([] if args.profile_all else ["--gil"]),
                                    "--format", "raw", "--output", raw, "--rate", str(args.profile_rate),
                                    "--duration", str(int(args.profile_seconds)), *(["--nonblocking"] if args.nonblocking else [])],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(1.0)
            res = bench.drive(port, server.pid, args.lines, closed=args.concurrency,
                              duration=args.profile_seconds - 2, max_settlements=profiled)
            print(f"  profiled  {args.lines} lines: {run.fmt(res)}", flush=True)
            err, _ = spy.communicate(timeout=args.profile_seconds + 60)
            print(err.decode(errors="replace")[-2000:], file=sys.stderr)
            doc["profile"] = summarise_profile(raw, os.path.join(args.profile, "top.txt"))
            doc["profile"]["worker_pid"] = worker
            print(f"profile: {doc['profile']['samples']} GIL samples; {args.profile}/top.txt", flush=True)
    finally:
        run.stop_process(server)
        run.stop_process(echo)
        store.close()
        rp.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        print("written", common.write_results(args.out, doc))
    else:
        print(json.dumps({k: v for k, v in doc.items() if k != "profile"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
