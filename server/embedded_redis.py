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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis caps cluster ports at 55535."""
    import random
    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterProcesses:
    """A real Redis Cluster on loopback: `masters` masters with `replicas` replicas each, created
    with `redis-cli --cluster create`. For tests, benchmarks and local trials of a sharded setup."""

    def __init__(self, masters: int = 3, replicas: int = 1, *, appendonly: bool = False,
                 appendfsync: str = "everysec", base_dir: str | None = None):
        self.count = masters * (replicas + 1)
        self.replicas = replicas
        self._tmp = None
        if base_dir is None:
            self._tmp = base_dir = tempfile.mkdtemp(prefix="tracecode-cluster-")
        self.nodes = [
            RedisProcess(os.path.join(base_dir, f"node{i}"), port=free_cluster_port(), appendonly=appendonly,
                         appendfsync=appendfsync,
                         extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no",
                                "--cluster-allow-reads-when-down", "no"])
            for i in range(self.count)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def start(self, timeout: float = 30.0) -> "RedisClusterProcesses":
        try:
            self._create(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout: float) -> None:
        for n in self.nodes:
            n.start()
        cli = shutil.which("redis-cli")
        if not cli:
            raise RuntimeError("redis-cli not found (it comes with redis-server: apt-get install redis-server)")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach state ok with all slots covered")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                info = redis.Redis.from_url(n.url, socket_timeout=1, decode_responses=True).cluster("info")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
            # A replica that is still syncing cannot acknowledge writes (WAIT): not healthy yet.
            repl = redis.Redis.from_url(n.url, socket_timeout=1, decode_responses=True).info("replication")
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return False
        return True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not recover")
            time.sleep(0.1)

    def master_of(self, key: str) -> RedisProcess:
        """The node currently serving `key`'s slot as master."""
        client = redis.Redis.from_url(self.nodes[0].url if self.nodes[0].alive() else
                                      next(n for n in self.nodes if n.alive()).url, decode_responses=True)
        slot = client.cluster("keyslot", key)
        for shard in client.cluster("slots"):
            if shard[0] <= slot <= shard[1]:
                port = int(shard[2][1])
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no master for slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
