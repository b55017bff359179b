"""Shared pieces of the benchmarks: machine facts, a throw-away Redis, generated data, and the
Redis ceiling (the same scripts pipelined straight at Redis, no gRPC, no per-request Python)."""
from __future__ import annotations

import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import redis

from tracecode import codec
from tracecode.server.store import RedisProcess, free_port
from tracecode.server.store import Store

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "redis": redis_version, "codec": codec.IMPLEMENTATION, "platform": platform.platform(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_results(name: str, doc: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return path


def redis_config() -> list[str]:
    """The redis-server settings tracecode's data layout needs (store/embedded.py's LISTPACK_CONFIG:
    hash listpack limits raised so layout 2's bucket hashes stay compact); [] before it existed."""
    from tracecode.server.store import embedded
    return list(getattr(embedded, "LISTPACK_CONFIG", []))


def start_redis(appendonly: bool = True, unix_socket: bool = False, auto_rewrite: bool = True,
                extra: list[str] | None = None) -> RedisProcess:
    """Production-like: AOF on with fsync every second (the embedded default), the listpack
    settings of `redis_config()` (the same for every layout, so comparisons are fair). unix_socket:
    also listen on `unix_url(rp)`, as the embedded Redis of `tracecode serve` is reached.
    auto_rewrite False: no automatic AOF rewrite, whose fork would land in some measurement at random.
    extra: more redis-server arguments, after those (a later setting wins: memory.py's what-if runs)."""
    rp = RedisProcess(port=free_port(), appendonly=appendonly, appendfsync="everysec")
    if " ".join(redis_config()) not in " ".join(rp.argv()):  # RedisProcess may pass them itself
        rp.extra = redis_config()
    if unix_socket:
        rp.extra += ["--unixsocket", os.path.join(rp.data_dir, "redis.sock"), "--unixsocketperm", "700"]
    if not auto_rewrite:
        rp.extra += ["--auto-aof-rewrite-percentage", "0"]
    rp.extra += extra or []
    return rp.start()


def unix_url(rp: RedisProcess) -> str:
    return f"unix://{os.path.join(rp.data_dir, 'redis.sock')}"


def cn20_codes(n: int, seed: int = 1, product: str = "8123456") -> list[str]:
    rnd = random.Random(seed)
    seen = set()
    while len(seen) < n:
        seen.add(f"{product}{rnd.randrange(10**9):09d}{rnd.randrange(10**4):04d}")
    return sorted(seen)


def load_issuance(store: Store, codes: list[str], product: str = "8123456", pack_units: int = 1,
                  chunk: int = 2000) -> float:
    start = time.perf_counter()
    for i in range(0, len(codes), chunk):
        store.upsert_issuance([(c, product, "", "B1", 20301231, pack_units, "bench", "")
                               for c in codes[i:i + chunk]], replace=False)
    return time.perf_counter() - start


class RawPipeline:
    """Pre-encoded commands sent over one socket in pipelined batches, replies parsed by hiredis:
    the least client work per command Python can do, so the measurement is Redis's."""

    def __init__(self, port: int):
        import hiredis
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.error_type = hiredis.ReplyError

    def run(self, payloads: list[bytes], depth: int) -> list:
        replies = []
        for i in range(0, len(payloads), depth):
            batch = payloads[i:i + depth]
            self.sock.sendall(b"".join(batch))
            want = len(batch)
            while want:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("redis closed the connection")
                self.reader.feed(data)
                while want:
                    r = self.reader.gets()
                    if r is False:
                        break
                    if isinstance(r, self.error_type):
                        raise RuntimeError(str(r))
                    replies.append(r)
                    want -= 1
        return replies

    def close(self) -> None:
        self.sock.close()


def encode(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def ceiling(store: Store, port: int, calls: list, depth: int = 64) -> float:
    """Seconds Redis needs for these verify.lua calls when they are pipelined straight at it."""
    sha = store.scripts['verify'].sha
    r = redis.Redis(port=port)
    r.script_load(store.scripts['verify'].script)
    payloads = []
    for call in calls:
        keys, args = store.verify_call(call)
        payloads.append(encode("EVALSHA", sha, len(keys), *keys, *args))
    pipe = RawPipeline(port)
    start = time.perf_counter()
    pipe.run(payloads, depth)
    elapsed = time.perf_counter() - start
    pipe.close()
    return elapsed


def replay_ceiling(store: Store, calls: list) -> float:
    """Seconds Redis needs for a REPLAY job's own calls, sent exactly as the job sends them: the
    store's pipelined verify_batch, one slice of SLICE_ALONE settlements at a time on one
    connection, over the transport the server uses (give a store on the server's Redis URL).
    Every slice is packed before the clock starts, so nothing but Redis and the socket is timed:
    the job does this same work plus its Python, so job / ceiling <= 1 by construction (up to
    the machine's drift between the two runs; run.py takes the faster of a run before and after)."""
    from tracecode.server.api.bulk import SLICE_ALONE
    slices = [store.prepare_batch(calls[i:i + SLICE_ALONE]) for i in range(0, len(calls), SLICE_ALONE)]
    start = time.perf_counter()
    for prepared in slices:
        store.verify_batch(prepared)
    return time.perf_counter() - start


def proc_mb(pid: int, name: str, key: str) -> float:
    """A kB figure of /proc/<pid>/<name> (the line starting with `key`) in MB; 0 when the
    process is gone or the file is not readable."""
    try:
        with open(f"/proc/{pid}/{name}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of a process (Linux /proc VmHWM), MB; 0 once it is gone."""
    return proc_mb(pid, "status", "VmHWM:")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a `tracecode serve` supervisor and its workers)."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for c in fh.read().split():
                out += process_tree(int(c))
    except FileNotFoundError:
        pass
    return out


def tree_cpu(pid: int) -> float:
    return sum(cpu_of(p) for p in process_tree(pid))


def peak_rss_mb_of(pid_status: tuple) -> float:
    """ru_maxrss of os.wait4's rusage (KiB on Linux) in MB."""
    return pid_status[2].ru_maxrss / 1024


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def python() -> str:
    return sys.executable


def start_serve(redis_url: str, metrics_port: int = 0, log_level: str = "WARNING") -> tuple[subprocess.Popen, int]:
    """`tracecode serve` (its default workers) on a free port; returns the process and the port
    once it is listening."""
    proc = subprocess.Popen([python(), "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0",
                             "--redis-url", redis_url, "--metrics-port", str(metrics_port), "--log-level", log_level],
                            stdout=subprocess.PIPE, text=True, env=env_for_subprocess())
    from tracecode.server.workers import READY_PREFIX
    while not (line := proc.stdout.readline()).startswith(READY_PREFIX):
        if not line:
            raise SystemExit(f"tracecode serve exited with {proc.wait()} before listening")
    return proc, int(line.split()[-1])


def stop_all(server: subprocess.Popen | None, store: Store, rp: RedisProcess) -> None:
    """A benchmark's teardown: the serve process (drained), the store's connections, Redis."""
    if server:
        server.terminate()
        server.wait(30)
    store.close()
    rp.stop()
