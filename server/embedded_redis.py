"""A supervised redis-server child process: the embedded default of `tracecode serve`, and the
throw-away servers of the tests and benchmarks."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

log = logging.getLogger("tracecode.redis")

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
                 appendfsync: str = "everysec", extra: list[str] | None = None):
        self.binary = shutil.which("redis-server")
        if not self.binary:
            raise RuntimeError(INSTALL_HINT)
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
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        net = (["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]
               if self.socket_path else ["--port", str(self.port), "--bind", "127.0.0.1"])
        return [self.binary, *net, "--dir", self.data_dir, "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
                "--logfile", os.path.join(self.data_dir, "redis.log"), "--daemonize", "no",
                *self.extra]

    def start(self, timeout: float = 10.0) -> "RedisProcess":
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
        """SHUTDOWN (flushes the AOF), then wait; SIGKILL as the last resort."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                redis.Redis.from_url(self.url, socket_timeout=2).shutdown(nosave=not self.appendonly)
            except (redis.ConnectionError, redis.ResponseError):
                pass
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
