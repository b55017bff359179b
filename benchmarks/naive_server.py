"""The naive baseline of benchmarks/run.py: the same gRPC API (tracecode.v1.Verification /
VerifyDispense), implemented the way one would at first: a sync gRPC server, and per scanned
code one GET and one SET with plain redis-py. No parsing, no rules, no atomicity (two racing
pharmacies can both get OK), no idempotency, no audit: strictly less work than tracecode.

    python benchmarks/naive_server.py --listen 127.0.0.1:PORT --redis-url URL [--threads 16] [--echo]

Prints `naive listening on port N` once serving; stops on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import redis

from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc


class NaiveVerification(verification_pb2_grpc.VerificationServicer):
    def __init__(self, r: redis.Redis, prefix: str):
        self.r = r
        self.prefix = prefix

    def VerifyDispense(self, request, context):
        first = f"{request.site_id}|{request.settlement_id}"
        results = []
        for i, ln in enumerate(request.lines):
            key = self.prefix + ln.raw_code
            if self.r.get(key) is None:
                self.r.set(key, first)
                verdict = pb.OK
            else:
                verdict = pb.DUPLICATE
            results.append(pb.LineResult(line_index=i, verdict=verdict, canonical_code=ln.raw_code))
        return pb.VerifyDispenseResponse(settlement_id=request.settlement_id, site_id=request.site_id,
                                         recorded=True, results=results)


class Echo(NaiveVerification):
    """The floor of the measurement: gRPC (server and load generator) and nothing else."""

    def VerifyDispense(self, request, context):
        return pb.VerifyDispenseResponse(
            settlement_id=request.settlement_id, site_id=request.site_id, recorded=True,
            results=[pb.LineResult(line_index=i, verdict=pb.OK, canonical_code=ln.raw_code)
                     for i, ln in enumerate(request.lines)])


def wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(3600):
        pass


def supervise(args) -> int:
    """--processes N: N copies of this server on one port (gRPC sets SO_REUSEPORT, so the kernel
    spreads connections over them, as it does for tracecode's workers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, os.path.abspath(__file__), "--listen", f"127.0.0.1:{port}", "--redis-url", args.redis_url,
            "--threads", str(args.threads), "--prefix", args.prefix] + (["--echo"] if args.echo else [])
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(args.processes)]
    try:
        for c in children:
            if not c.stdout.readline().startswith("naive listening"):
                raise SystemExit("naive: a server process failed to start")
        print(f"naive listening on port {port}", flush=True)
        wait_for_stop()
    finally:
        for c in children:
            c.terminate()
        for c in children:
            c.wait(10)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--prefix", default="naive:")
    ap.add_argument("--echo", action="store_true",
                    help="no Redis at all: answer OK per line at once (the gRPC + load generator floor)")
    ap.add_argument("--processes", type=int, default=1,
                    help="that many server processes on one SO_REUSEPORT port (as tracecode serve --workers)")
    args = ap.parse_args()
    if args.processes > 1:
        return supervise(args)
    r = redis.Redis.from_url(args.redis_url, max_connections=args.threads + 4)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads))
    verification_pb2_grpc.add_VerificationServicer_to_server(
        (Echo if args.echo else NaiveVerification)(r, args.prefix), server)
    port = server.add_insecure_port(args.listen)
    server.start()
    print(f"naive listening on port {port}", flush=True)
    wait_for_stop()
    server.stop(2).wait()
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
