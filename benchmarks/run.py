"""tracecode against the physical limit and a naive baseline, in one run, on one machine and Redis.

    python benchmarks/run.py            # ~5 minutes on the 2-core dev machine

One fresh redis-server (AOF, fsync every second, as production), then:

  ceiling   the very verify.lua calls tracecode makes for settlements of 1, 5 and 20 lines,
            pre-encoded and pipelined straight at Redis (common.ceiling): no gRPC, no Python per
            request. What Redis itself can do; nothing built on it can do more.
  naive     benchmarks/naive_server.py, its own process: the same VerifyDispense API served by a
            sync gRPC server doing one GET and one SET per code with plain redis-py.
  tracecode `tracecode serve` (default --workers / --threads), its own processes, on the POS
            path: max settlements/s and codes/s in a closed loop (alternating with naive, --reps
            runs each, median kept); then latency p50/p99/p999 in an
            open loop (fixed send rate, latency from each request's scheduled send time, so
            queueing cannot hide behind a slowed-down client) at fractions of that max, 50 %
            being the reported point.
  bulk      `tracecode reverify` (a separate process, as operators run it) over a generated export
            against the same server, and the same REPLAY verify.lua calls pipelined at Redis.
  live      the live rules' cost (issue 27): two `tracecode serve`, --live-rules and
            --no-live-rules, on the same Redis, both sent settlements of one product spread over
            --live-insured insured ids (so persons buy again at other sites and STOCKPILING
            notices fire): 5-line closed-loop max alternately (--reps, median) and p99 in an open
            loop at half the rules-off max, side by side. Only this phase: --phases live
            (writes benchmarks/results/live_rules.json).
  floor     naive_server.py --echo in as many processes as tracecode has workers: gRPC and the
            load generator, no Redis. Open loop at tracecode's 50 % point (the latency the
            measuring chain itself adds) and closed-loop max per size: no gRPC-Python server can
            answer faster on this machine, so echo / naive bounds tracecode / naive.

The load generators (benchmarks/loadgen.py, grpc.aio, pre-serialised requests) are separate
processes; their CPU use is reported beside the server's and Redis's, since on 2 cores they all
compete. Every request loop is bounded in count and time; all traffic is to 127.0.0.1.

Writes benchmarks/results/latest.json and benchmarks/results/latency.png; prints the ratios
tracecode / ceiling, tracecode / naive, tracecode / echo and echo / naive.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tracecode.server.store.types import SettlementCall  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.store.keys import KeySpace  # noqa: E402
from tracecode.server.store import now_ms  # noqa: E402
from tracecode.server.verifier import Line, Verifier  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PRODUCT = "8123456"
SIZES = (1, 5, 20)
TARGET_P99_MS = 5.0


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------- CPU accounting

def cpu_snapshot(groups: dict[str, int]) -> dict[str, dict[int, float]]:
    """CPU seconds of each process tree (server parent + workers, Redis, ...)."""
    return {name: {p: common.cpu_of(p) for p in common.process_tree(pid)} for name, pid in groups.items()}


def cpu_used(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Cores used by each group between two snapshots."""
    return {name: round(sum(v - before[name].get(p, 0.0) for p, v in after[name].items()) / seconds, 2)
            for name in after}


def _stat() -> tuple[int, int]:
    """(all, idle) jiffies of the machine."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def system_busy(seconds: float = 1.0) -> float:
    """Cores busy machine-wide over `seconds` (to flag a machine that is not quiet)."""
    def read():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return round((1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1), 2)


# ---------------------------------------------------------------------- codes

class CodePool:
    """Fresh issued codes, handed out once each (a used code would be judged DUPLICATE, another
    path). Issuance is loaded in chunks as the pool is used, between measurements only; the pool
    grows by itself when a fast machine needs more codes than --codes (it never runs out)."""

    def __init__(self, store, total: int):
        self.store = store
        self.codes = common.cn20_codes(total, seed=7, product=PRODUCT)
        self._seen = set(self.codes)
        self._seed = 7
        self.next = 0
        self.loaded = 0
        self.load_seconds = 0.0

    def _grow(self, n: int) -> None:
        """n more distinct codes, none seen before (a new seed each time)."""
        added: list[str] = []
        while len(added) < n:
            self._seed += 1
            for code in common.cn20_codes(n - len(added), seed=self._seed, product=PRODUCT):
                if code not in self._seen:
                    self._seen.add(code)
                    added.append(code)
        self.codes += added
        log(f"  (code pool grown by {n:,} to {len(self.codes):,})")

    def issue_first(self, n: int) -> None:
        """The first n codes of the pool issued (bulk REPLAY uses them in its own namespace)."""
        if n > len(self.codes):
            self._grow(n - len(self.codes))
        if n > self.loaded:
            self.load_seconds += common.load_issuance(self.store, self.codes[self.loaded:n], PRODUCT)
            self.loaded = n

    def ensure(self, n: int) -> None:
        if self.next + n > len(self.codes):
            self._grow(max(n, len(self.codes) // 2))
        want = self.next + n
        if want > self.loaded:
            self.issue_first(min(max(want, self.loaded + 50_000), len(self.codes)))

    def take(self, n: int) -> list[str]:
        self.ensure(n)
        out = self.codes[self.next:self.next + n]
        self.next += n
        return out

    def give_back(self, codes: list[str]) -> None:
        """Unused codes of the last phase (contiguous at the end of what was taken) return."""
        if codes and self.codes[self.next - len(codes):self.next] == codes:
            self.next -= len(codes)


def bench_key(tmp: str) -> str:
    """The run's one insured-pseudonym key file: every server of the run must have the same one
    (the data set's marker holds its fingerprint)."""
    from tracecode.rules.pseudonym import generate_key_file
    path = os.path.join(tmp, "pseudonym.key")
    return path if os.path.exists(path) else generate_key_file(path)


def bench_config() -> Config:
    """The benchmark's own store settings."""
    return Config(listen="127.0.0.1:0", metrics_port=0)


# ---------------------------------------------------------------------- processes

def start_process(argv: list[str], ready_prefix: str, log_path: str, timeout: float = 60.0):
    """Start a server process; wait (bounded) for the line announcing its port."""
    fh = open(log_path, "ab")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=fh, text=True, env=common.env_for_subprocess())
    lines: queue.Queue = queue.Queue()
    # A thread, not select(): readline() may buffer the ready line behind an earlier one.
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            proc.kill()
            raise SystemExit(f"{argv[:4]} did not start within {timeout} s; log {log_path}") from None
        if line is None:
            raise SystemExit(f"{argv[:4]} exited ({proc.wait()}); log {log_path}")
        if line.startswith(ready_prefix):
            return proc, int(line.rsplit(" ", 1)[1])


def stop_process(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    def __init__(self, args, tmp: str, pool: CodePool, redis_pid: int):
        self.args, self.tmp, self.pool, self.redis_pid = args, tmp, pool, redis_pid
        self.files = 0

    def drive(self, port: int, server_pid: int, lines: int, *, closed: int = 0, rate: float = 0.0,
              duration: float, max_settlements: int) -> dict:
        """One measurement: args.clients load generator processes, each with its own slice of
        fresh codes, started together; returns the merged result with CPU use per party."""
        n_proc = self.args.clients
        per = max(max_settlements // n_proc, 1)
        slices, procs = [], []
        try:
            for _ in range(n_proc):
                codes = self.pool.take(per * lines)
                self.files += 1
                path = os.path.join(self.tmp, f"codes-{self.files}.txt")
                with open(path, "w", encoding="ascii") as fh:
                    fh.write("\n".join(codes) + "\n")
                slices.append(codes)
                argv = [common.python(), os.path.join(HERE, "loadgen.py"), "--target", f"127.0.0.1:{port}",
                        "--codes", path, "--settlements", str(per), "--lines", str(lines),
                        "--duration", str(duration), "--channels", str(self.args.channels)]
                argv += ["--closed", str(max(closed // n_proc, 1))] if closed else ["--rate", str(rate / n_proc)]
                procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            for p in procs:
                if p.stdout.readline().strip() != "ready":
                    raise SystemExit(f"load generator failed to start ({p.wait()})")
            groups = {"server": server_pid, "redis": self.redis_pid}
            before = cpu_snapshot(groups)
            stat0 = _stat()
            t0 = time.monotonic()
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = []
            for p in procs:
                r, _, _ = select.select([p.stdout], [], [], duration + 60)
                if not r:
                    raise SystemExit("load generator did not finish in time")
                outs.append(json.loads(p.stdout.readline()))
                p.wait(30)
            wall = time.monotonic() - t0
            after = cpu_snapshot(groups)
            stat1 = _stat()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        # Codes a generator never sent go back to the pool (the last slice's tail only: slices
        # are contiguous and handed out in order).
        sent_last = outs[-1]["sent"] if outs else 0
        self.pool.give_back(slices[-1][sent_last * lines:])
        lat = sorted(x for o in outs for x in o["latencies_s"])
        elapsed = max(o["elapsed_s"] for o in outs)
        completed = sum(o["completed"] for o in outs)
        errors: dict[str, int] = {}
        verdicts: dict[str, int] = {}
        for o in outs:
            for k, v in o["errors"].items():
                errors[k] = errors.get(k, 0) + v
            for k, v in o["verdicts"].items():
                verdicts[k] = verdicts.get(k, 0) + v
        cpu = cpu_used(before, after, wall)
        cpu["loadgen"] = round(sum(o["cpu_s"] for o in outs) / elapsed, 2)
        # Everything else the machine ran meanwhile (other users of a shared machine): noise.
        busy = (1 - (stat1[1] - stat0[1]) / max(stat1[0] - stat0[0], 1)) * (os.cpu_count() or 1)
        cpu["other"] = round(max(busy - cpu["server"] - cpu["redis"] - sum(o["cpu_s"] for o in outs) / wall, 0.0), 2)
        res = {"lines": lines, "completed": completed, "sent": sum(o["sent"] for o in outs),
               "errors": errors, "seconds": round(elapsed, 2),
               "settlements_per_s": round(completed / elapsed, 1),
               "codes_per_s": round(completed * lines / elapsed, 1),
               "cpu_cores": cpu, "sampled_verdicts": verdicts,
               "count_bound_hit": any(o["exhausted"] for o in outs)}
        if lat:
            res["latency_ms"] = {q: round(lat[min(int(len(lat) * f), len(lat) - 1)] * 1e3, 2)
                                 for q, f in (("p50", .5), ("p90", .9), ("p99", .99), ("p999", .999))}
            res["latency_ms"]["max"] = round(lat[-1] * 1e3, 2)
        if closed:
            res["concurrency"] = closed
        else:
            res["offered_per_s"] = round(rate, 1)
        return res


def fmt(res: dict) -> str:
    lat = res.get("latency_ms", {})
    cpu = " ".join(f"{k} {v:.2f}" for k, v in res["cpu_cores"].items())
    extra = f" errors {res['errors']}" if res["errors"] else ""
    return (f"{res['settlements_per_s']:>8,.0f} settl/s {res['codes_per_s']:>9,.0f} codes/s  p50 {lat.get('p50', 0):6.2f} "
            f"p99 {lat.get('p99', 0):7.2f} p999 {lat.get('p999', 0):7.2f} ms  cores: {cpu}{extra}")


# ---------------------------------------------------------------------- phases

def ceiling_phase(store, verifier: Verifier, port: int, pool: CodePool, settlements: dict[int, int]) -> dict:
    out = {}
    for lines in SIZES:
        m = settlements[lines]
        codes = pool.take(m * lines)
        at = now_ms()
        calls = []
        for n in range(m):
            ls = [Line(c, PRODUCT) for c in codes[n * lines:(n + 1) * lines]]
            plan, distinct, _ = verifier.plan_lines(ls)
            sid = f"ceil-{lines}-{n}"
            calls.append(SettlementCall(dispense=True, site=f"S{n % 997:05d}", settlement_id=sid, settled_at_ms=at,
                              settle_day=verifier.settle_day(at), all_or_nothing=False, lines=plan, codes=distinct,
                              digest=verifier.digest(f"S{n % 997:05d}", sid, at, False, ls)))
        seconds = common.ceiling(store, port, calls)
        out[lines] = {"settlements": m, "seconds": round(seconds, 3), "settlements_per_s": round(m / seconds, 1),
                      "codes_per_s": round(m * lines / seconds, 1)}
        log(f"  ceiling  {lines:>2} lines: {m / seconds:>8,.0f} settl/s {m * lines / seconds:>9,.0f} codes/s")
    return out


def bulk_phase(args, tmp: str, store, verifier: Verifier, redis_url: str, target: str, pool: CodePool,
               server_pid: int, redis_pid: int) -> dict:
    import bulk
    # REPLAY judges in its own namespace: any issued code will do, used live or not.
    pool.issue_first(args.bulk_records + 1000)
    codes = pool.codes[:args.bulk_records + 1000]
    export = os.path.join(tmp, "export.csv")
    settlements = bulk.generate(export, codes, args.bulk_records)

    def ceiling_seconds(namespace: str) -> float:
        """The job's own Redis calls (common.replay_ceiling) in a namespace of their own."""
        keys = KeySpace(namespace)
        calls = []
        for site, sid, at, cs in settlements:
            ls = [Line(c, PRODUCT) for c in cs]
            plan, distinct, _ = verifier.plan_lines(ls)
            calls.append(SettlementCall(dispense=True, site=site, settlement_id=sid, settled_at_ms=at,
                              settle_day=verifier.settle_day(at), all_or_nothing=False, lines=plan, codes=distinct,
                              state=keys, state_ttl_s=86400, digest=verifier.digest(site, sid, at, False, ls)))
        # On the server's own transport (the unix socket), as the job's calls travel.
        same_path = make_store(bench_config(), redis_url)
        try:
            return common.replay_ceiling(same_path, calls)
        finally:
            same_path.drop_namespace(keys)
            same_path.close()

    ceiling_before = ceiling_seconds("tc-job-ceiling-1")
    out_dir = os.path.join(tmp, "bulk-report")
    t0 = time.monotonic()
    cli = subprocess.Popen([common.python(), "-m", "tracecode.cli", "reverify", export, "--server", target,
                            "--out", out_dir, "--job-id", "bench", "--quiet"],
                           stdout=subprocess.PIPE, text=True, env=common.env_for_subprocess())
    before = cpu_snapshot({"server": server_pid, "redis": redis_pid})
    deadline = time.monotonic() + 180
    while True:  # bounded: reverify gets 180 s
        pid, status, usage = os.wait4(cli.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            cli.kill()
            cli.wait()
            raise SystemExit("tracecode reverify took more than 180 s")
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    cpu = cpu_used(before, cpu_snapshot({"server": server_pid, "redis": redis_pid}), elapsed)
    cpu["reverify_cli"] = round((usage.ru_utime + usage.ru_stime) / elapsed, 2)
    cli.returncode = os.waitstatus_to_exitcode(status)
    summary = cli.stdout.read().strip()
    if cli.returncode != 0:
        raise SystemExit(f"tracecode reverify failed ({cli.returncode})")
    # Again after the job, and the faster of the two: the VM's speed drifts over a minute.
    ceiling_after = ceiling_seconds("tc-job-ceiling-2")
    ceil_s = min(ceiling_before, ceiling_after)
    ceiling_rps = args.bulk_records / ceil_s
    rps = args.bulk_records / elapsed
    return {"records": args.bulk_records, "settlements": len(settlements), "seconds": round(elapsed, 2),
            "records_per_s": round(rps), "ceiling_records_per_s": round(ceiling_rps),
            "ceiling_seconds_before_after": [round(ceiling_before, 2), round(ceiling_after, 2)],
            "ratio_to_ceiling": round(rps / ceiling_rps, 3), "cpu_cores": cpu, "summary": summary}


def _metric_sum(port: int, name: str) -> dict[str, float]:
    """A Prometheus counter's samples by label text, from a server's /metrics."""
    import urllib.request
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as fh:
        for row in fh.read().decode().splitlines():
            if row.startswith(name + "{"):
                labels, value = row[len(name):].rsplit(" ", 1)
                out[labels] = float(value)
    return out


def live_ceiling(store, verifier: Verifier, port: int, redis_pid: int, pool: CodePool, insured: int, reps: int = 3,
                 n: int = 4000) -> dict:
    """Redis's own cost of the live rules: the same 5-line verify.lua calls pipelined straight at
    Redis (common.ceiling) with the live rules' argument and without, alternately, each call for
    one of `insured` persons (pseudonyms). No gRPC and no Python per call: what remains is the
    rules' Lua and their keys, free of the load generator's noise."""
    from tracecode.rules import live
    arg = live.load(None).lua_arg(store.keys.prefix, "J")
    out: dict[str, list] = {"off": [], "on": []}
    cpu_us: dict[str, list] = {"off": [], "on": []}
    for rep in range(reps):
        for name in ("off", "on"):
            codes = pool.take(n * 5)
            at = now_ms()
            calls = []
            for i in range(n):
                ls = [Line(c, PRODUCT) for c in codes[i * 5:(i + 1) * 5]]
                plan, distinct, _ = verifier.plan_lines(ls)
                site, sid = f"S{i % 997:05d}", f"live-{insured}-{name}-{rep}-{i}"
                calls.append(SettlementCall(
                    dispense=True, site=site, settlement_id=sid, settled_at_ms=at, settle_day=verifier.settle_day(at),
                    all_or_nothing=False, lines=plan, codes=distinct, digest=verifier.digest(site, sid, at, False, ls),
                    insured=f"k1.{(i * 7919) % insured:032x}", live=arg if name == "on" else ""))
            cpu0 = common.cpu_of(redis_pid)
            seconds = common.ceiling(store, port, calls)
            cpu_us[name].append(round((common.cpu_of(redis_pid) - cpu0) / n * 1e6, 1))
            out[name].append(round(n / seconds, 1))
    med = {k: sorted(v)[len(v) // 2] for k, v in out.items()}
    cpu = {k: sorted(v)[len(v) // 2] for k, v in cpu_us.items()}
    return {"settlements": n, "runs_settlements_per_s": out, "settlements_per_s": med,
            "cost": round(1 - med["on"] / med["off"], 3),
            # Redis CPU per settlement: less sensitive to a busy machine than the wall clock.
            "runs_redis_cpu_us_per_settlement": cpu_us, "redis_cpu_us_per_settlement": cpu,
            "redis_cpu_cost_us": round(cpu["on"] - cpu["off"], 1)}


def live_phase(args, tmp: str, bench: "Bench", redis_url: str, ceiling: dict | None = None) -> dict:
    """The live rules on and off, same Redis, same load (module docstring, `live`)."""
    lines = 5
    os.environ["TRACECODE_LOADGEN_INSURED"] = str(args.live_insured)  # loadgen.py reads it
    servers: dict[str, tuple] = {}
    try:
        for name, flag in (("off", "--no-live-rules"), ("on", "--live-rules")):
            mport = common.free_port()
            argv = [common.python(), "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0", "--redis-url", redis_url,
                    "--metrics-port", str(mport), "--log-level", "WARNING", "--data-dir", os.path.join(tmp, "live"),
                    "--pseudonym-key-file", bench_key(tmp), flag]
            if args.workers is not None:
                argv += ["--workers", str(args.workers)]
            if args.threads is not None:
                argv += ["--threads", str(args.threads)]
            proc, port = start_process(argv, "tracecode listening on port ", os.path.join(tmp, f"serve-live-{name}.log"))
            servers[name] = (proc, port, mport)
        time.sleep(0.5)
        for proc, port, _ in servers.values():  # warm-up, not reported
            bench.drive(port, proc.pid, lines, closed=args.concurrency, duration=1.5, max_settlements=5000)
        runs: dict[str, list] = {"off": [], "on": []}
        for _ in range(args.reps):  # alternately: both under the same drift of the machine
            for name, (proc, port, _) in servers.items():
                res = bench.drive(port, proc.pid, lines, closed=args.concurrency, duration=args.max_seconds,
                                  max_settlements=int(6000 * args.max_seconds) + 100)
                runs[name].append(res)
                log(f"  live {name:<3} {lines:>2} lines: {fmt(res)}")
        out: dict = {"lines": lines, "insured_ids": args.live_insured}
        if ceiling:
            out["redis_ceiling"] = ceiling
        for name in runs:
            ordered = sorted(runs[name], key=lambda r: r["settlements_per_s"])
            med = dict(ordered[len(ordered) // 2])
            med["runs_settlements_per_s"] = [r["settlements_per_s"] for r in runs[name]]
            out[name] = {"max": med}
        # p99 at half load: the same offered rate for both, half the rules-off max.
        # Alternately, --reps times, the run with the median p99 kept: a busy spell of the shared
        # machine then lands on either side, not on whichever ran during it.
        rate = out["off"]["max"]["settlements_per_s"] / 2
        secs = args.live_latency_seconds
        opens: dict[str, list] = {"off": [], "on": []}
        for _ in range(args.reps):
            for name, (proc, port, _) in servers.items():
                r = bench.drive(port, proc.pid, lines, rate=rate, duration=secs, max_settlements=int(rate * secs) + 10)
                opens[name].append(r)
                log(f"  live {name:<3} open @{rate:,.0f}/s: {fmt(r)}")
        for name, rs in opens.items():
            ordered = sorted(rs, key=lambda r: r["latency_ms"]["p99"])
            out[name]["at_half_load"] = dict(ordered[len(ordered) // 2])
            out[name]["at_half_load"]["runs_p99_ms"] = [r["latency_ms"]["p99"] for r in rs]
        out["live_rule_results"] = _metric_sum(servers["on"][2], "tracecode_live_rule_results_total")
        off, on = out["off"], out["on"]
        for side in (off, on):  # CPU per settlement at max load: steadier than rates on a busy machine
            m = side["max"]
            side["cpu_ms_per_settlement"] = {k: round(m["cpu_cores"][k] / m["settlements_per_s"] * 1e3, 4)
                                             for k in ("server", "redis")}
        out["throughput_cost"] = round(1 - on["max"]["settlements_per_s"] / off["max"]["settlements_per_s"], 3)
        out["p99_cost_ms"] = round(on["at_half_load"]["latency_ms"]["p99"] - off["at_half_load"]["latency_ms"]["p99"], 2)
        log(f"  live rules: {off['max']['settlements_per_s']:,.0f} -> {on['max']['settlements_per_s']:,.0f} settl/s "
            f"({out['throughput_cost']:+.1%} cost); p99 at {rate:,.0f}/s {off['at_half_load']['latency_ms']['p99']:.2f} -> "
            f"{on['at_half_load']['latency_ms']['p99']:.2f} ms; CPU ms per settlement off {off['cpu_ms_per_settlement']} "
            f"on {on['cpu_ms_per_settlement']}; results {out['live_rule_results']}")
        return out
    finally:
        os.environ.pop("TRACECODE_LOADGEN_INSURED", None)
        for proc, _, _ in servers.values():
            stop_process(proc)


def plot(doc: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SIZES), figsize=(5 * len(SIZES), 4.2), sharey=True)
    for ax, lines in zip(axes, SIZES):
        t = doc["tracecode"][str(lines)]
        pts = sorted(t["open_loop"], key=lambda r: r["offered_per_s"])
        x = [r["offered_per_s"] for r in pts]
        for q, style in (("p50", "o-"), ("p99", "s-"), ("p999", "^-")):
            ax.plot(x, [r["latency_ms"][q] for r in pts], style, label=q, markersize=4)
        ax.axvline(t["max"]["settlements_per_s"], color="grey", ls=":", label="closed-loop max")
        ax.axvline(t["max"]["settlements_per_s"] / 2, color="grey", ls="--", lw=0.8, label="50 % of max")
        ax.axhline(TARGET_P99_MS, color="red", ls="--", lw=0.8, label="5 ms target")
        if lines == 5 and "floor" in doc:
            ax.plot([doc["floor"]["offered_per_s"]], [doc["floor"]["latency_ms"]["p99"]], "kx", markersize=9,
                    label="p99 floor: gRPC echo, no Redis")
            ax.legend(fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"{lines}-line settlements")
        ax.set_xlabel("offered load, settlements/s (open loop)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency from scheduled send, ms")
    axes[0].legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"tracecode POS latency vs offered load — {m['cores']} cores, {m['cpu']}, "
                 f"workers {doc['server']['workers']}, Redis {m['redis_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- main

def summarise(doc: dict) -> None:
    """Ratios and targets from whatever phases completed (a failed late phase leaves the earlier
    figures standing; what is missing is simply absent)."""
    ratios = {}
    ceiling = doc.get("ceiling", {})
    log("\nratios (codes/s)     tracecode/ceiling  tracecode/naive  tracecode/echo  echo/naive")
    for lines in SIZES:
        t = doc.get("tracecode", {}).get(str(lines), {}).get("max", {}).get("codes_per_s")
        c = ceiling.get(lines, {}).get("codes_per_s")
        n = doc.get("naive", {}).get(str(lines), {}).get("codes_per_s")
        if not (t and c and n):
            continue
        e = doc.get("floor_max", {}).get(str(lines), {}).get("codes_per_s", 0.0)
        ratios[str(lines)] = {"tracecode_over_ceiling": round(t / c, 3), "tracecode_over_naive": round(t / n, 2)}
        if e:
            # echo/naive bounds tracecode/naive: no server in this chain can answer faster than the echo.
            ratios[str(lines)].update(tracecode_over_echo=round(t / e, 3), echo_over_naive=round(e / n, 2))
        log(f"  {lines:>2} lines           {t / c:>10.2f}       {t / n:>10.2f}      "
            + (f"{t / e:>10.2f}  {e / n:>10.2f}" if e else "         -           -"))
    bulk = doc.get("bulk", {})
    bulk_ratio = bulk.get("ratio_to_ceiling", 0.0)
    log(f"  bulk records/s             {bulk_ratio:>10.2f}" + ("" if "error" not in bulk else "  (FAILED)"))
    doc["ceiling"] = {str(k): v for k, v in ceiling.items()}
    doc["ratios"] = ratios
    targets = {}
    half = doc.get("tracecode", {}).get("5", {}).get("at_half_max")
    if half:
        p99_5 = half["latency_ms"]["p99"]
        targets["p99_ms_at_half_max_5_lines"] = {"value": p99_5, "target": TARGET_P99_MS, "met": p99_5 <= TARGET_P99_MS}
    for lines, want in (("5", 5), ("20", 10)):
        if lines in ratios:
            v = ratios[lines]["tracecode_over_naive"]
            targets[f"codes_vs_naive_{lines}_lines"] = {"value": v, "target": want, "met": v >= want}
    # Server CPU per settlement against the echo server's CPU per call (issue 19), at max load
    # (closed loop), 5 lines: cores used over settlements per second, both from this run.
    t5 = doc.get("tracecode", {}).get("5", {}).get("max")
    e5 = doc.get("floor_max", {}).get("5")
    if t5 and e5 and t5["settlements_per_s"] and e5["settlements_per_s"]:
        t_ms = t5["cpu_cores"]["server"] / t5["settlements_per_s"] * 1e3
        e_ms = e5["cpu_cores"]["server"] / e5["settlements_per_s"] * 1e3
        doc["cpu_per_settlement_ms"] = {"tracecode_5_lines": round(t_ms, 4), "echo_5_lines": round(e_ms, 4)}
        v = round(t_ms / e_ms, 2)
        targets["server_cpu_vs_echo_5_lines"] = {"value": v, "target": 1.5, "met": v <= 1.5}
        log(f"  server CPU per 5-line settlement {t_ms:.3f} ms, echo per call {e_ms:.3f} ms: {v:.2f}x")
    live = doc.get("live_rules")
    if live and "throughput_cost" in live:
        targets["live_rules_throughput_cost_5_lines"] = {"value": live["throughput_cost"], "target": 0.10,
                                                         "met": live["throughput_cost"] <= 0.10}
        targets["live_rules_p99_cost_ms_at_half_load"] = {"value": live["p99_cost_ms"], "target": 1.0,
                                                          "met": live["p99_cost_ms"] <= 1.0}
    if bulk_ratio:
        targets["bulk_vs_ceiling"] = {"value": bulk_ratio, "target": 0.5, "met": bulk_ratio >= 0.5}
    doc["targets"] = targets


class _Finished(Exception):
    """The phases asked for are done (--phases): skip to writing the results."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="tracecode serve --workers (default: its default)")
    ap.add_argument("--threads", type=int, default=None, help="tracecode serve --threads (default: its default)")
    ap.add_argument("--clients", type=int, default=1, help="load generator processes")
    # Many connections, as many pharmacies make: the kernel spreads connections (not calls) over
    # the SO_REUSEPORT workers, and with a handful of them one worker often gets most of the load.
    ap.add_argument("--channels", type=int, default=32, help="gRPC connections per load generator")
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop: calls in flight in total")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="closed-loop duration per size and run")
    ap.add_argument("--reps", type=int, default=3, help="closed-loop runs per size and server (median kept)")
    ap.add_argument("--latency-seconds", type=float, default=15.0, help="open loop at 50 %% of max, per size")
    ap.add_argument("--curve-seconds", type=float, default=4.0, help="other open-loop points, per size")
    ap.add_argument("--curve", default="0.1,0.25,0.75,0.9", help="other open-loop points, fractions of max")
    # Enough that the job's fixed costs (CLI start, connect, namespace drop) do not set the figure.
    ap.add_argument("--bulk-records", type=int, default=200_000)
    ap.add_argument("--codes", type=int, default=2_000_000,
                    help="initial size of the fresh code pool (issued as needed; it grows when used up)")
    ap.add_argument("--phases", choices=("all", "live"), default="all",
                    help="all: every phase; live: only the live rules on/off (default out: live_rules.json)")
    ap.add_argument("--live-latency-seconds", type=float, default=8.0,
                    help="live phase: each open-loop run at half load (--reps runs per side)")
    ap.add_argument("--live-insured", type=int, default=2_000,
                    help="live phase: insured ids the settlements are spread over (a person buys again every "
                         "this many settlements, at another site: most persons pass STOCKPILING within a run)")
    ap.add_argument("--out", default=None, help="results file name (default latest.json, live_rules.json)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    args.out = args.out or ("live_rules.json" if args.phases == "live" else "latest.json")
    started = time.monotonic()
    # SIGTERM ends the run through the `finally` blocks: servers and Redis stopped, no orphans.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    busy = system_busy(1.0)
    log(f"machine busy before the run: {busy:.2f} cores" + ("  (NOT QUIET: figures will be low)" if busy > 0.2 else ""))
    tmp = tempfile.mkdtemp(prefix="tracecode-bench-")
    # AOF with fsync every second, as production; automatic AOF rewrites off: the fork of one
    # would land in whichever measurement it happens to hit (a periodic cost, not per call).
    rp = common.start_redis(unix_socket=True, auto_rewrite=False)
    config = bench_config()
    store = make_store(config, rp.url)
    verifier = Verifier(store, config)
    pool = CodePool(store, args.codes)
    naive = server = None
    doc: dict = {"benchmark": "tracecode POS and bulk paths vs the Redis ceiling and a naive baseline",
                 "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
                 "machine": common.machine(), "busy_cores_before": busy}
    doc["machine"]["redis_version"] = doc["machine"]["redis"].split()[2].removeprefix("v=")
    phase = "setup"
    try:
        import grpc
        doc["machine"]["grpcio"] = grpc.__version__
        pool.ensure(300_000)
        log(f"redis {doc['machine']['redis_version']} (AOF everysec) on port {rp.port} and {common.unix_url(rp)}; "
            f"{pool.loaded:,} codes issued in {pool.load_seconds:.1f} s")

        if args.phases == "live":
            phase = "live"
            log("live: the live rules on and off, 5-line settlements")
            ceil = live_ceiling(store, verifier, rp.port, rp.proc.pid, pool, args.live_insured)
            log(f"  redis ceiling 5 lines: off {ceil['settlements_per_s']['off']:,.0f}, on "
                f"{ceil['settlements_per_s']['on']:,.0f} settl/s ({ceil['cost']:+.1%}); Redis CPU "
                f"{ceil['redis_cpu_us_per_settlement']} us per settlement")
            doc["live_rules"] = live_phase(args, tmp, Bench(args, tmp, pool, rp.proc.pid), common.unix_url(rp), ceil)
            phase = "done"
            raise _Finished
        phase = "ceiling"
        log("ceiling: the same verify.lua calls, pre-encoded, pipelined 64 deep at Redis")
        doc["ceiling"] = ceiling_phase(store, verifier, rp.port, pool, {1: 20_000, 5: 6_000, 20: 2_000})

        log("naive: one process, sync gRPC, GET + SET per code with redis-py")
        naive, nport = start_process([common.python(), os.path.join(HERE, "naive_server.py"), "--listen", "127.0.0.1:0",
                                      "--redis-url", common.unix_url(rp)], "naive listening on port ",
                                     os.path.join(tmp, "naive.log"))
        bench = Bench(args, tmp, pool, rp.proc.pid)

        # Metrics on, as in production (with workers: multiprocess files, aggregated by the parent).
        argv = [common.python(), "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0",
                "--redis-url", common.unix_url(rp), "--metrics-port", str(common.free_port()),
                "--log-level", "WARNING", "--pseudonym-key-file", bench_key(tmp)]
        if args.workers is not None:
            argv += ["--workers", str(args.workers)]
        if args.threads is not None:
            argv += ["--threads", str(args.threads)]
        server, port = start_process(argv, "tracecode listening on port ", os.path.join(tmp, "serve.log"))
        time.sleep(0.5)
        procs = common.process_tree(server.pid)
        from tracecode.server import workers as wk
        defaults = Config()
        doc["server"] = {"workers": args.workers if args.workers is not None else wk.resolve(defaults.workers),
                         "threads": args.threads or defaults.threads, "processes": len(procs),
                         "redis": "unix socket", "metrics": "on", "argv": " ".join(argv[2:])}
        log(f"tracecode: {doc['server']['workers']} worker(s) x {doc['server']['threads']} threads "
            f"(pids {' '.join(map(str, procs))})")
        # Warm-up of both (connections, pools, first-call paths); not reported.
        bench.drive(port, server.pid, 5, closed=args.concurrency, duration=1.5, max_settlements=5000)
        bench.drive(nport, naive.pid, 5, closed=args.concurrency, duration=1.0, max_settlements=2000)

        phase = "max"
        # Max (closed loop): naive and tracecode alternately, --reps times each, median reported.
        # The machine's speed drifts over minutes (a shared VM): alternating puts both under the
        # same drift, so their ratio holds better than either figure.
        doc["naive"], doc["tracecode"] = {}, {}
        for lines in SIZES:
            ceil = doc["ceiling"][lines]["settlements_per_s"]
            runs = {"naive": [], "tracecode": []}
            for _ in range(args.reps):
                for name, p, proc in (("naive", nport, naive), ("tracecode", port, server)):
                    bound = (int(4000 * args.max_seconds / lines) + 100 if name == "naive"
                             else int(min(ceil, 6000) * args.max_seconds * 1.1) + 100)
                    res = bench.drive(p, proc.pid, lines, closed=args.concurrency, duration=args.max_seconds,
                                      max_settlements=bound)
                    runs[name].append(res)
                    log(f"  {name:<9} {lines:>2} lines: {fmt(res)}")
            for name in runs:
                ordered = sorted(runs[name], key=lambda r: r["codes_per_s"])
                med = dict(ordered[len(ordered) // 2])
                med["runs_codes_per_s"] = [r["codes_per_s"] for r in runs[name]]
                if name == "naive":
                    doc["naive"][str(lines)] = med
                else:
                    doc["tracecode"][str(lines)] = {"max": med, "open_loop": []}
            log(f"  median    {lines:>2} lines: naive {doc['naive'][str(lines)]['codes_per_s']:,.0f} codes/s, "
                f"tracecode {doc['tracecode'][str(lines)]['max']['codes_per_s']:,.0f} codes/s")
        stop_process(naive)
        naive = None

        phase = "latency"
        # Latency (open loop) at fractions of tracecode's median max.
        for lines in SIZES:
            entry = doc["tracecode"][str(lines)]
            top = entry["max"]["settlements_per_s"]
            fractions = [0.5] + [float(f) for f in args.curve.split(",") if f]
            for f in fractions:
                secs = args.latency_seconds if f == 0.5 else args.curve_seconds
                r = bench.drive(port, server.pid, lines, rate=top * f, duration=secs,
                                max_settlements=int(top * f * secs) + 10)
                r["fraction_of_max"] = f
                entry["open_loop"].append(r)
                if f == 0.5:
                    entry["at_half_max"] = r
                log(f"  open {int(f * 100):>3}% {lines:>2} lines: {fmt(r)}")

        phase = "live"
        log("live: the live rules on and off, 5-line settlements (their own two servers)")
        doc["live_rules"] = live_phase(args, tmp, bench, common.unix_url(rp),
                                       live_ceiling(store, verifier, rp.port, rp.proc.pid, pool, args.live_insured))

        phase = "bulk"
        log(f"bulk: tracecode reverify of {args.bulk_records:,} records vs the job's own REPLAY calls sent alone")
        try:
            doc["bulk"] = bulk_phase(args, tmp, store, verifier, common.unix_url(rp), f"127.0.0.1:{port}", pool,
                                     server.pid, rp.proc.pid)
            b = doc["bulk"]
            log(f"  bulk: {b['records_per_s']:,} records/s; ceiling {b['ceiling_records_per_s']:,} records/s; "
                f"ratio {b['ratio_to_ceiling']:.2f}")
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - the POS figures stand on their own
            doc["bulk"] = {"error": str(exc)}
            log(f"  bulk FAILED: {exc}")
        stop_process(server)
        server = None

        phase = "floor"
        # The floor: the same load generator against a gRPC server that answers at once, no
        # Redis: what the measuring chain itself (Python gRPC both ends, 2 shared cores) adds.
        # As many echo processes as tracecode has workers, so both get the same share of the cores.
        echo, eport = start_process([common.python(), os.path.join(HERE, "naive_server.py"), "--echo",
                                     "--listen", "127.0.0.1:0", "--redis-url", common.unix_url(rp),
                                     "--processes", str(doc["server"]["workers"])],
                                    "naive listening on port ", os.path.join(tmp, "echo.log"))
        try:
            rate = doc["tracecode"]["5"]["at_half_max"]["offered_per_s"]
            r = bench.drive(eport, echo.pid, 5, rate=rate, duration=args.curve_seconds * 2,
                            max_settlements=int(rate * args.curve_seconds * 2) + 10)
            doc["floor"] = {"what": "benchmarks/naive_server.py --echo (gRPC only, no Redis), open loop, "
                                    "5 lines, at the rate of tracecode's 50 % point", **r}
            log(f"  floor  @{rate:,.0f}/s  5 lines: {fmt(r)}")
            # The most any gRPC-Python server could answer in this chain: the echo at max load.
            doc["floor_max"] = {}
            for lines in SIZES:
                r = bench.drive(eport, echo.pid, lines, closed=args.concurrency, duration=args.max_seconds,
                                max_settlements=int(8000 * args.max_seconds))
                doc["floor_max"][str(lines)] = r
                log(f"  floor max   {lines:>2} lines: {fmt(r)}")
        finally:
            stop_process(echo)
        phase = "done"
    except _Finished:
        pass
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - what was measured is still written
        doc["failed"] = {"phase": phase, "error": f"{type(exc).__name__}: {exc}"}
        log(f"FAILED in phase {phase}: {exc}; writing what was measured")
    finally:
        stop_process(server)
        stop_process(naive)
        store.close()
        rp.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ ratios and targets
    summarise(doc)
    doc["run_seconds"] = round(time.monotonic() - started, 1)
    log("targets: " + "; ".join(f"{k} {v['value']} ({'met' if v['met'] else 'MISSED'}, target {v['target']})"
                                for k, v in doc["targets"].items()))
    path = common.write_results(args.out, doc)
    log(f"written {path}")
    if not args.no_plot and args.phases == "all":
        png = os.path.join(common.RESULTS, os.path.splitext(args.out)[0].replace("latest", "latency") + ".png")
        plot(doc, png)
        log(f"written {png}")
    log(f"run took {doc['run_seconds']:.0f} s")
    return 1 if "failed" in doc else 0


if __name__ == "__main__":
    sys.exit(main())
