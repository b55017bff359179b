"""`tracecode serve --workers N`: N server processes sharing the gRPC port, one supervising parent.

Why processes: one CPython process runs Python on one core at a time (the GIL), and a settlement
is mostly Python (gRPC's per-call machinery, the verifier, the response). N processes bound to
the same port with SO_REUSEPORT let the kernel spread incoming connections over them; each
process is the ordinary single-process server (app.serve) with its own threads, Redis
connection pool and health watch. docs/performance.md has the measurements behind the default.

The parent does no gRPC work. It
  - starts the embedded redis-server (when no --redis-url), shared by every worker, before the
    workers and stops it after the last one has exited;
  - resolves the port (`:0` becomes one concrete port for all) and keeps a bound, non-listening
    SO_REUSEPORT socket on it for its lifetime, so a restarting worker always gets it back;
  - serves /metrics for all of them: the workers write their metrics to files in a private
    PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) and the parent's endpoint
    aggregates them (counters and histograms summed over workers, dead ones included so nothing
    goes backwards; gauges as declared in metrics.py), plus tracecode_workers and
    tracecode_worker_restarts_total;
  - creates the file through which the workers share the time of the last POS call, so a bulk
    job on any worker yields to POS calls on every worker (priority.py);
  - restarts a worker that dies (with backoff when it keeps dying);
  - forwards SIGTERM / SIGINT to the workers, which drain as a single server does, and exits 0
    once all have exited (SIGKILL after grace_s + a margin).

Workers run in their own sessions (process groups), so a terminal's Ctrl-C reaches them once, through the
parent; each reads its configuration from a pipe on stdin and keeps that pipe open: if the parent
dies without a word (SIGKILL), the pipe closes and the worker drains and exits on its own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .config import Config

log = logging.getLogger("tracecode.workers")

READY_PREFIX = "tracecode listening on port "
# A worker that exits within this many seconds of its start counts as crash-looping: its next
# restart waits twice as long as the previous one (up to _MAX_BACKOFF_S).
_STABLE_S = 30.0
_MIN_BACKOFF_S, _MAX_BACKOFF_S = 0.5, 30.0
_READY_TIMEOUT_S = 60.0

# Set in a worker process (its 1-based index): app.serve() then runs the server itself instead
# of supervising.
_worker_index: int | None = None
_WORKER_ENV = "TRACECODE_INTERNAL_WORKER"  # in a worker's environment (no Config field has this name)


def in_worker() -> bool:
    return _worker_index is not None


def resolve(workers: int) -> int:
    """--workers: 0 means one per core this process may run on."""
    if workers > 0:
        return workers
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


# ---------------------------------------------------------------------- the port

def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def reserve_port(listen: str) -> tuple[str, socket.socket | None]:
    """(listen address with a concrete port, reservation socket).

    First a plain bind (SO_REUSEADDR only): it fails if anything listens on the port, even another
    server with SO_REUSEPORT, which the workers would otherwise silently share the port with.
    Then a bound SO_REUSEPORT socket, kept and never listening (connections only go to listening
    sockets): the workers join it, and the port stays ours while a worker restarts."""
    host, port = _split_listen(listen)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {listen}: {exc}") from None
        port = probe.getsockname()[1]
    finally:
        probe.close()
    keep = socket.socket(family, socket.SOCK_STREAM)
    try:
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        keep.bind((addr[0], port, *addr[2:]))
    except OSError as exc:
        keep.close()
        raise RuntimeError(f"cannot listen on {listen}: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}", keep


# ---------------------------------------------------------------------- metrics

class _Metrics:
    """The parent's /metrics: every worker's metrics (multiprocess files) plus its own."""

    def __init__(self, config: Config, host: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess, start_http_server
        self.dir = tempfile.mkdtemp(prefix="tracecode-metrics-")
        self._multiprocess = multiprocess
        registry = CollectorRegistry(auto_describe=True)
        multiprocess.MultiProcessCollector(registry, path=self.dir)
        self.running = Gauge("tracecode_workers", "Worker processes listening (tracecode serve --workers)",
                             registry=registry)
        self.restarts = Counter("tracecode_worker_restarts_total",
                                "Worker processes restarted after they exited unexpectedly", registry=registry)
        self.port = None
        if config.metrics_port:
            try:
                self._httpd, self._thread = start_http_server(config.metrics_port, addr=host, registry=registry)
            except OSError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            self.port = self._httpd.server_address[1]

    def process_dead(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters stay: totals must not go backwards)."""
        try:
            self._multiprocess.mark_process_dead(pid, self.dir)
        except OSError:
            pass

    def close(self) -> None:
        if self.port is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------- one worker

class _Worker:
    def __init__(self, index: int):
        self.index = index
        # Set by start() before anything reads it (the supervisor only tends started workers).
        self.proc: subprocess.Popen = None  # type: ignore[assignment]
        self.ready = threading.Event()
        self.started_at = 0.0
        self.backoff = _MIN_BACKOFF_S
        self.restart_at: float | None = None
        self.counted = False  # in tracecode_workers (listening)

    def start(self, config: Config, env: dict) -> None:
        doc = json.dumps(dataclasses.asdict(config))
        self.ready.clear()
        self.started_at = time.monotonic()
        self.restart_at = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracecode.server.app", "--worker", str(self.index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
            text=True, bufsize=1)
        assert self.proc.stdin is not None  # stdin=PIPE
        self.proc.stdin.write(doc + "\n")
        self.proc.stdin.flush()  # and kept open: its EOF tells the worker the parent is gone
        threading.Thread(target=self._read, args=(self.proc,), name=f"tracecode-worker-{self.index}-out",
                         daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout or ():
            if line.startswith(READY_PREFIX):
                if proc is self.proc:
                    self.ready.set()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def close_pipe(self) -> None:
        if self.proc and self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


def _worker_config(config: Config, listen: str, redis_url: str | None) -> Config:
    changes = dict(listen=listen, metrics_port=0)
    if redis_url is not None:
        # The parent's embedded Redis: no credentials or TLS, as in a single-process serve.
        changes.update(redis_url=redis_url, redis_username="", redis_password_file="",
                       redis_tls_ca="", redis_tls_cert="", redis_tls_key="")
    return config.replace(**changes)


def supervise(config: Config) -> int:
    """Run config.workers server processes until SIGTERM/SIGINT; see the module docstring."""
    if os.environ.get(_WORKER_ENV):
        # Never supervise from inside a worker, whatever went wrong: no process avalanche.
        raise RuntimeError("tracecode worker process asked to supervise workers")
    from . import priority  # the parent sets up logging and the embedded Redis as a single server does
    from . import metrics as tc_metrics
    from .logs import setup_logging
    from .store import EmbeddedRedis

    setup_logging(config)
    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("signal %s: already draining", name)
            return
        log.info("signal %s: draining (grace %.1f s): %d workers", name, config.grace_s, config.workers)
        received.append(signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    metrics = embedded = reservation = None
    workers = [_Worker(i) for i in range(1, config.workers + 1)]
    code = 0
    try:
        metrics = _Metrics(config, host)
        listen, reservation = reserve_port(config.listen)
        url = None
        if not config.redis_url:
            embedded = EmbeddedRedis(config.data_dir, appendfsync=config.redis_appendfsync,
                                     backoff_s=(config.redis_restart_s, max(config.redis_restart_s, 10.0)),
                                     on_restart=lambda _why: tc_metrics.EMBEDDED_REDIS_RESTARTS.inc()).start()
            url = embedded.url
            log.info("no --redis-url: started embedded redis-server, data in %s", embedded.data_dir)
        wconfig = _worker_config(config, listen, url)
        # The workers' shared POS clock (priority.py) lives beside their metrics files.
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics.dir, _WORKER_ENV: "1",
               priority.SHARED_ENV: priority.create_shared(metrics.dir)}
        for w in workers:
            w.start(wconfig, env)
        # Every worker listening (or one failing) before the port is announced.
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not stopping.is_set() and not all(w.ready.is_set() for w in workers):
            failed = [w for w in workers if not w.alive()]
            if failed:
                raise RuntimeError(f"worker {failed[0].index} exited with {failed[0].proc.returncode} "
                                   "before it was listening (its log above says why)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not listening within {_READY_TIMEOUT_S:.0f} s")
            stopping.wait(0.05)
        if not stopping.is_set():
            for w in workers:
                w.counted = True
            metrics.running.set(len(workers))
            log.info("tracecode: %d workers listening on %s (pids %s)", len(workers), listen,
                     " ".join(str(w.proc.pid) for w in workers))
            if metrics.port is not None:
                print(f"tracecode metrics on port {metrics.port}", flush=True)
            print(f"{READY_PREFIX}{_split_listen(listen)[1]}", flush=True)
        while not stopping.wait(0.2):
            _tend(workers, wconfig, env, metrics)
    except (RuntimeError, OSError) as exc:  # port or metrics port taken, Redis or a worker failed
        log.error("%s", exc)
        code = 1
    finally:
        _stop_all(workers, received[0] if received else signal.SIGTERM, config, metrics)
        if embedded:
            embedded.stop()
            log.info("embedded redis-server stopped")
        if reservation:
            reservation.close()
        if metrics:
            metrics.close()
    log.info("tracecode stopped")
    return code


def _tend(workers: list[_Worker], config: Config, env: dict, metrics: _Metrics) -> None:
    """Restart workers that died (not asked to), with backoff when they keep dying."""
    now = time.monotonic()
    for w in workers:
        if w.restart_at is None and w.proc is not None and w.proc.poll() is not None:
            rc = w.proc.returncode
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"code {rc}"
            metrics.process_dead(w.proc.pid)
            if w.counted:
                w.counted = False
                metrics.running.dec()
            if now - w.started_at >= _STABLE_S:
                w.backoff = _MIN_BACKOFF_S
            w.restart_at = now + w.backoff
            log.error("worker %d (pid %d) exited with %s: restarting in %.1f s", w.index, w.proc.pid, how, w.backoff)
            w.backoff = min(w.backoff * 2, _MAX_BACKOFF_S)
        elif w.restart_at is not None and now >= w.restart_at:
            w.close_pipe()
            w.start(config, env)
            metrics.restarts.inc()
            log.info("worker %d restarted (pid %d)", w.index, w.proc.pid)
        elif not w.counted and w.ready.is_set() and w.alive():
            w.counted = True
            metrics.running.inc()


def _stop_all(workers: list[_Worker], signum: int, config: Config, metrics: _Metrics | None) -> None:
    """Forward the signal; wait for every worker to drain and exit; SIGKILL after the grace."""
    for w in workers:
        w.signal(signum)
    deadline = time.monotonic() + config.grace_s + config.redis_timeout_s + 10
    for w in workers:
        if w.proc is None:
            continue
        try:
            w.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error("worker %d (pid %d) still running after the grace period: SIGKILL", w.index, w.proc.pid)
            w.proc.kill()
            w.proc.wait()
        w.close_pipe()
        if metrics:
            metrics.process_dead(w.proc.pid)
    if any(w.proc and w.proc.returncode not in (0, None) for w in workers):
        log.warning("worker exit codes: %s", ", ".join(f"{w.index}: {w.proc.returncode}" for w in workers if w.proc))


# ---------------------------------------------------------------------- worker side

def _watch_parent() -> None:
    """Block on stdin (the parent's pipe); EOF means the parent is gone: stop like on SIGTERM."""
    try:
        while sys.stdin.readline():
            pass
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def worker_main(serve, argv: list[str] | None = None) -> int:
    """A worker process's life: its index from argv, its Config from the parent's pipe, its log
    lines tagged, then serve(config) (app.serve, handed in: this module never imports app, which
    imports it). Entered as `python -m tracecode.server.app --worker N`."""
    global _worker_index
    argv = sys.argv[1:] if argv is None else argv
    _worker_index = int(argv[0])

    def early_stop(_signum, _frame):
        # Until serve() installs its draining handlers (its first step) nothing is served yet.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, early_stop)
    signal.signal(signal.SIGINT, early_stop)
    doc = json.loads(sys.stdin.readline())
    config = Config(**doc)
    index, pid = _worker_index, os.getpid()
    factory = logging.getLogRecordFactory()

    def record(*args, **kwargs):
        r = factory(*args, **kwargs)
        r.name = f"{r.name}[w{index}:{pid}]"
        return r

    logging.setLogRecordFactory(record)
    threading.Thread(target=_watch_parent, name="tracecode-parent-watch", daemon=True).start()
    return serve(config)
