"""redis-server child processes: `EmbeddedRedis`, the supervised embedded default of
`tracecode serve`, and `RedisProcess`, the plain child it uses (and the tests' and benchmarks'
throw-away servers; the tests' cluster launcher is tests/redis_cluster.py).

The embedded Redis is the service's only copy of its state, so it is supervised like one:
- restarted with backoff when it dies (the health watch meanwhile reports NOT_SERVING, because
  pings fail; the store reconnects by itself), each death and restart logged;
- never orphaned: it gets SIGTERM when the tracecode process that started it dies, even by
  SIGKILL (a parent-death signal set by util-linux `setpriv --pdeathsig`);
- never run twice over one data dir: tracecode holds an exclusive lock on `tracecode.lock` in
  the data dir, and the redis-server inherits the locked file, so the lock stays held while
  either of them lives; a start that finds it held and a live redis-server named in
  `redis-server.pid` (an orphan) stops that one first (SIGTERM: it writes its AOF and exits);
- private: the data dir is 0700 and every file in it 0600 (redis-server runs under umask 077),
  because the AOF holds every dispense and settlement.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time

import redis

log = logging.getLogger("tracecode.redis")

# Layout 2 keeps ~200-400 codes per hash with values of ~100 bytes; Redis stores such a hash as
# one listpack (a few bytes per field) only under these limits, else as a hashtable (~70 bytes
# more per field). Correctness never depends on them, memory does: docs/scaling.md, operations.md.
LISTPACK_CONFIG = ["--hash-max-listpack-entries", "512", "--hash-max-listpack-value", "256"]

INSTALL_HINT = ("redis-server was not found on PATH. Install it (Debian/Ubuntu: "
                "`sudo apt-get install -y redis-server`; macOS: `brew install redis`) or pass "
                "--redis-url / TRACECODE_REDIS_URL to use an existing Redis.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """redis-server on a unix socket (port=None) or a loopback TCP port, data in `data_dir`."""

    def __init__(self, data_dir: str | None = None, port: int | None = None, *, appendonly: bool = True,
                 appendfsync: str = "everysec", extra: list[str] | None = None,
                 prefix: list[str] | None = None, pass_fds: tuple[int, ...] = (), umask: int = -1):
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError(INSTALL_HINT)
        self.binary: str = binary
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="tracecode-redis-")
            data_dir = self._tmp
        self.data_dir = os.path.abspath(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self.port = port
        self.socket_path = os.path.join(self.data_dir, "redis.sock") if port is None else None
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra = extra or []
        self.prefix = prefix or []  # e.g. setpriv --pdeathsig TERM --
        self.pass_fds = pass_fds
        self.umask = umask
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        net = (["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
               if self.socket_path else ["--port", str(self.port), "--bind", "127.0.0.1"])
        return [*self.prefix, self.binary, *net, "--dir", self.data_dir, "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
                "--logfile", os.path.join(self.data_dir, "redis.log"), "--daemonize", "no",
                *LISTPACK_CONFIG, *self.extra]

    def start(self, timeout: float = 10.0) -> "RedisProcess":
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     pass_fds=self.pass_fds, umask=self.umask)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err} "
                                       f"(log: {os.path.join(self.data_dir, 'redis.log')})")
                try:
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.02)
        finally:
            client.close()
        log.info("embedded redis-server pid %s at %s (AOF %s)", self.proc.pid, self.url,
                 self.appendfsync if self.appendonly else "off")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis-server then fsyncs the AOF and exits, like SHUTDOWN), wait; SIGKILL as
        the last resort."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


LOCK_FILE = "tracecode.lock"
PID_FILE = "redis-server.pid"
# Restart backoff after the embedded redis-server died: doubling from the first to the last.
RESTART_BACKOFF_S = (0.2, 10.0)
# A redis-server up this long is healthy again: the next death restarts after the first backoff.
STABLE_S = 30.0


class DataDirInUse(RuntimeError):
    """Another tracecode (or its redis-server) is running over the data dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_redis_over(pid: int, data_dir: str) -> bool:
    """Whether `pid` is a redis-server working in data_dir (not a recycled pid). Read from the
    process's executable and working directory: redis-server rewrites its command line, and it
    changes into its --dir."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    # Debian's redis-server is a link to redis-check-rdb (one binary, named by argv[0]).
    binary = shutil.which("redis-server")
    ours = os.path.basename(exe).startswith("redis-server") or (
        binary is not None and os.path.realpath(binary) == exe)
    return ours and cwd == data_dir


def _tighten(data_dir: str) -> None:
    """Data dir 0700, everything in it 0600 (dirs 0700): an older start may have left 0644."""
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
        for f in files:
            path = os.path.join(root, f)
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                os.chmod(path, 0o600)


class EmbeddedRedis:
    """The supervised redis-server of `tracecode serve` without --redis-url (module docstring).
    `on_restart(reason)` is called after each restart (metrics)."""

    def __init__(self, data_dir: str, *, appendfsync: str = "everysec", on_restart=None,
                 backoff_s: tuple[float, float] = RESTART_BACKOFF_S):
        self.data_dir = os.path.abspath(data_dir)
        self.appendfsync = appendfsync
        self.on_restart = on_restart or (lambda reason: None)
        self.backoff_s = backoff_s
        self.restarts = 0
        self._lock_fd: int | None = None
        self._child: RedisProcess | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        setpriv = shutil.which("setpriv")
        self._prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []

    @property
    def url(self) -> str:
        return f"unix://{os.path.join(self.data_dir, 'redis.sock')}"

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child and child.proc else None

    def start(self) -> "EmbeddedRedis":
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self._lock()
        try:
            _tighten(self.data_dir)
            if not self._prefix:
                log.warning("setpriv (util-linux) not found: the embedded redis-server will not be stopped "
                            "if tracecode is killed; the next start stops it instead")
            self._spawn()
        except BaseException:
            self._unlock()
            raise
        self._monitor = threading.Thread(target=self._watch, name="tracecode-redis-supervisor", daemon=True)
        self._monitor.start()
        return self

    def _lock(self) -> None:
        path = os.path.join(self.data_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not self._try_lock(fd):
                # Held: by a running tracecode, or only by an orphaned redis-server of a tracecode
                # that was killed (the server inherited the locked file).
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                in_use = DataDirInUse(f"data dir {self.data_dir} is in use by another tracecode (pid "
                                      f"{holder}); one data dir serves one tracecode at a time")
                if not holder.isdigit() or _pid_alive(int(holder)):
                    raise in_use
                self._stop_orphan()
                deadline = time.monotonic() + 10
                while not self._try_lock(fd):
                    if time.monotonic() > deadline:
                        raise in_use
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _stop_orphan(self) -> None:
        """Stop a redis-server left over this data dir by a tracecode that died (pid file)."""
        try:
            with open(os.path.join(self.data_dir, PID_FILE)) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return
        if not pid or not _is_redis_over(pid, self.data_dir):
            return
        log.warning("an orphaned redis-server (pid %d) runs over %s: stopping it (SIGTERM) before starting",
                    pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and _is_redis_over(pid, self.data_dir):
            if time.monotonic() > deadline:
                log.error("orphaned redis-server %d ignored SIGTERM for 30 s: SIGKILL", pid)
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def _spawn(self) -> None:
        assert self._lock_fd is not None, "spawned before the data dir was locked"
        child = RedisProcess(self.data_dir, appendfsync=self.appendfsync, prefix=self._prefix,
                             pass_fds=(self._lock_fd,), umask=0o077)
        child.start()
        self._child = child
        pid_path = os.path.join(self.data_dir, PID_FILE)
        with open(os.open(pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(f"{self.pid}\n")

    def _watch(self) -> None:
        """Restart the redis-server whenever it dies, until stop()."""
        first, last = self.backoff_s
        delay = first
        while not self._stopping.is_set():
            child = self._child
            if child is None:
                return
            started = time.monotonic()
            while child.alive() and not self._stopping.wait(0.1):
                pass
            if self._stopping.is_set():
                return
            rc = child.proc.returncode if child.proc else None
            how = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit code {rc}"
            if time.monotonic() - started > STABLE_S:
                delay = first
            log.error("embedded redis-server (pid %s) died (%s); restarting in %.1f s (its log: %s)",
                      child.proc.pid if child.proc else "?", how, delay, os.path.join(self.data_dir, "redis.log"))
            child.stop()
            while not self._stopping.wait(delay):
                try:
                    self._spawn()
                except (RuntimeError, OSError) as exc:
                    delay = min(delay * 2, last)
                    log.error("embedded redis-server restart failed (%s); next try in %.1f s", exc, delay)
                    continue
                self.restarts += 1
                log.warning("embedded redis-server restarted (pid %s, restart %d)", self.pid, self.restarts)
                self.on_restart(how)
                delay = min(delay * 2, last)
                break

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor and self._monitor is not threading.current_thread():
            self._monitor.join(15)
        if self._child:
            self._child.stop()
            self._child = None
        try:
            os.unlink(os.path.join(self.data_dir, PID_FILE))
        except OSError:
            pass
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def alive(self) -> bool:
        return self._child is not None and self._child.alive()
