"""tracecode's own CPU per 5-line settlement, without gRPC's transport and threads: VerifyDispense
called on one thread through the server's interceptor pipeline exactly as gRPC runs it (handler
lookup, LogContext, metrics, drain), then servicer, verifier, store and the Redis round trip
(a fresh redis-server, unix socket). Thread CPU time, 3 reps of --n settlements, median kept.

    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) python benchmarks/settle_inproc.py   # as a --workers worker

A low-noise A/B of the Python on the settlement path (docs/performance.md, issue 19): the
closed-loop figures of run.py / cpu.py move ±10 % between runs on a shared machine.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from google.protobuf import timestamp_pb2  # noqa: E402
from grpc import _server as grpc_server  # noqa: E402 - grpc's own call details type

from tracecode.server.api.server import Server  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.v1 import verification_pb2 as pb  # noqa: E402

class Context:
    """The few ServicerContext methods the handlers call on a successful settlement."""

    def code(self):
        return None

    def is_active(self):
        return True

    def time_remaining(self):
        return 5.0

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def abort(self, *a):
        raise RuntimeError(a)

    def abort_with_status(self, *a):
        raise RuntimeError(a)


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--n", type=int, default=3000, help="settlements per rep")
args = ap.parse_args()
rp = common.start_redis(unix_socket=True, auto_rewrite=False)
try:
    config = Config(listen="127.0.0.1:0", metrics_port=0, pseudonym_key_file="")
    store = make_store(config, common.unix_url(rp))
    n = args.n
    codes = common.cn20_codes(n * 5 * 3, seed=3)
    common.load_issuance(store, codes)
    srv = Server(config, store)
    # The handler as gRPC finds and runs it: through the server's interceptor pipeline.
    method = "/tracecode.v1.Verification/VerifyDispense"
    details = grpc_server._HandlerCallDetails(method, ())
    state = srv.grpc._state

    def find(d):
        m = state.registered_method_handlers.get(method)
        if m is not None:
            return m
        for h in state.generic_handlers:
            r = h.service(d)
            if r is not None:
                return r
        return None
    pipeline = state.interceptor_pipeline
    now = time.time()
    ts = timestamp_pb2.Timestamp(seconds=int(now), nanos=int((now % 1) * 1e9))
    results = []
    for rep in range(3):
        reqs = [pb.VerifyDispenseRequest(
            settlement_id=f"ip{rep}-{i}", site_id=f"S{i % 997:05d}", settled_at=ts,
            lines=[pb.DispenseLine(raw_code=c, product_id="8123456") for c in codes[(rep * n + i) * 5:(rep * n + i + 1) * 5]])
            for i in range(n)]
        t0 = time.thread_time()
        for r in reqs:
            h = pipeline.execute(find, details)
            out = h.unary_unary(r, Context())
        dt = time.thread_time() - t0
        assert out.results[0].verdict == pb.OK, out
        results.append(dt / n * 1e6)
    print(f"CPU per 5-line settlement, µs (thread time, 3 reps of {n}): {[round(x) for x in results]}, "
          f"median {round(statistics.median(results))}")
finally:
    rp.stop()
