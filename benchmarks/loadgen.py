"""Load generator process for benchmarks/run.py: grpc.aio, pre-serialised requests, raw bytes on
the wire (no protobuf work per call in the timed loop), so it takes as little CPU as a Python
client can from a 2-core machine the server also runs on.

    python benchmarks/loadgen.py --target 127.0.0.1:PORT --codes FILE --first 0 --settlements N
        --lines 5 (--closed CONCURRENCY | --rate PER_S) --duration S [--channels K]

Protocol with the parent: prints `ready` once its requests are built and its channels connected,
waits for one line on stdin (`go`), runs, prints one JSON line with the result. Every loop is
bounded by --settlements (count) and --duration (time), and it talks only to 127.0.0.1.

Open loop (--rate): request i is due at t0 + i/rate whatever happened to earlier ones; its latency
is measured from that due time, so a server (or a client) that falls behind shows up as latency
instead of as fewer requests sent (no coordinated omission).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid

import grpc
from google.protobuf import timestamp_pb2

from tracecode.v1 import verification_pb2 as pb

METHOD = "/tracecode.v1.Verification/VerifyDispense"


def build(codes: list[str], lines: int, product: str, tag: str, insured: int = 0) -> list[bytes]:
    """One serialised VerifyDispenseRequest per `lines` consecutive codes; settled_at = now;
    with `insured`, each carries one of that many insured ids (benchmarks/sanctions.py)."""
    now = time.time()
    ts = timestamp_pb2.Timestamp(seconds=int(now), nanos=int((now % 1) * 1e9))
    out = []
    for n in range(len(codes) // lines):
        req = pb.VerifyDispenseRequest(
            settlement_id=f"{tag}-{n}", site_id=f"S{n % 997:05d}", settled_at=ts,
            lines=[pb.DispenseLine(raw_code=c, product_id=product) for c in codes[n * lines:(n + 1) * lines]],
            insured_id=f"BENCH-P-{n % insured:06d}" if insured else "")
        out.append(req.SerializeToString())
    return out


def verdict_counts(replies: list[bytes]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for raw in replies:
        for r in pb.VerifyDispenseResponse.FromString(raw).results:
            name = pb.Verdict.Name(r.verdict)
            counts[name] = counts.get(name, 0) + 1
    return counts


async def run(args, requests: list[bytes]) -> dict:
    # A local subchannel pool per channel: each channel is its own TCP connection, so SO_REUSEPORT
    # spreads them over the server's worker processes (channels with identical arguments would
    # otherwise share one connection).
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    channels = [grpc.aio.insecure_channel(args.target, options=options + [("tracecode.loadgen.channel", i)])
                for i in range(args.channels)]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    calls = [ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None) for ch in channels]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    samples: list[bytes] = []
    deadline_s = args.deadline
    k = len(calls)

    async def one(i: int, due: float) -> None:
        try:
            reply = await calls[i % k](requests[i], timeout=deadline_s)
        except grpc.RpcError as exc:  # aio raises AioRpcError
            name = exc.code().name if hasattr(exc, "code") else type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            return
        latencies.append(loop.time() - due)
        if i % 97 == 0:
            samples.append(reply)

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = loop.time()
    stop_at = t0 + args.duration
    n_max = len(requests)
    sent = 0
    if args.closed:
        counter = iter(range(n_max))

        async def worker() -> None:
            nonlocal sent
            for i in counter:
                now = loop.time()
                if now >= stop_at:
                    return
                sent += 1
                await one(i, now)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.closed))),
                               args.duration + deadline_s + 5)
    else:
        interval = 1.0 / args.rate
        pending: set[asyncio.Task] = set()
        n_due = min(n_max, int(args.duration * args.rate))
        for i in range(n_due):
            due = t0 + i * interval
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(i, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        if pending:
            await asyncio.wait(pending, timeout=deadline_s + 5)
    elapsed = loop.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for ch in channels:
        await ch.close()
    return {"sent": sent, "completed": len(latencies), "errors": errors, "elapsed_s": elapsed,
            "cpu_s": cpu, "latencies_s": latencies, "verdicts": verdict_counts(samples),
            "exhausted": sent >= n_max}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--codes", required=True, help="file with one code per line")
    ap.add_argument("--first", type=int, default=0, help="first code (line) of the file to use")
    ap.add_argument("--settlements", type=int, required=True, help="most settlements to send")
    ap.add_argument("--lines", type=int, default=5)
    ap.add_argument("--product", default="8123456")
    ap.add_argument("--closed", type=int, default=0, help="closed loop with this many calls in flight")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: settlements per second")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=5.0)
    # Also from the environment, so a harness that starts generators through run.Bench (which
    # builds their command line) can set it: benchmarks/sanctions.py.
    ap.add_argument("--insured", type=int, default=int(os.environ.get("TRACECODE_LOADGEN_INSURED", "0")),
                    help="insured ids to spread the settlements over (0: none)")
    args = ap.parse_args()
    if not args.target.startswith("127.0.0.1:"):
        raise SystemExit("loadgen: loopback targets only")
    if bool(args.closed) == bool(args.rate):
        raise SystemExit("loadgen: give exactly one of --closed or --rate")
    need = args.settlements * args.lines
    codes = []
    with open(args.codes, encoding="ascii") as fh:
        for n, line in enumerate(fh):
            if n >= args.first + need:
                break
            if n >= args.first:
                codes.append(line.strip())
    requests = build(codes, args.lines, args.product, f"lg{os.getpid()}-{uuid.uuid4().hex[:8]}", args.insured)
    if not requests:
        raise SystemExit("loadgen: no codes in range")
    result = asyncio.run(run(args, requests))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
