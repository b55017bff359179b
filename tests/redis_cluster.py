"""Test-only: a real Redis Cluster on loopback (masters with replicas), made of the store's
RedisProcess children and created with `redis-cli --cluster create`. The suite's cluster
backend, the cluster fault tests and local trials of a sharded setup use it; the service never
does, so it lives here and not in the store package."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from tracecode.server.store.embedded import RedisProcess


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis caps cluster ports at 55535."""
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
