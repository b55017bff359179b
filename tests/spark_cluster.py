"""Test-only: a real Apache Spark standalone cluster on loopback (one master, N workers), started
from pyspark's own distribution (its `bin/spark-class` and jars; nothing is downloaded) with its
work, log and local directories in a temp dir, and stopped by killing the process trees it
started and only those. tests/test_leads_standalone.py and `benchmarks/leads.py --standalone`
use it; the service never does, so it lives here and not in the leads package.

Imports only the standard library and pyspark (to find its distribution); needs `java` on PATH
(scripts/system-deps.txt)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request


def spark_home() -> str:
    """The pip package is a Spark distribution: bin/, sbin/ and jars/ beside the Python code."""
    import pyspark
    return os.path.dirname(os.path.abspath(pyspark.__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a worker's executor JVMs and their Python workers). Every thread's
    children: a JVM starts its children from other threads than its main one."""
    out = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                children = fh.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for c in children:
            out += process_tree(int(c))
    return out


class SparkStandalone:
    """A master and `workers` workers of `cores` cores and `memory` each, on 127.0.0.1.

    `client_env()` is the environment a driver (`tracecode leads --engine spark`) runs in: its
    SPARK_CONF_DIR holds a spark-defaults.conf with `driver_memory`, Spark's own way to cap the
    driver's JVM (it must be set before that JVM starts, so not from inside a session)."""

    def __init__(self, workers: int = 2, cores: int = 1, memory: str = "1g", driver_memory: str = "512m",
                 base_dir: str | None = None, start_timeout: float = 120.0):
        self.n_workers, self.cores, self.memory = workers, cores, memory
        self.driver_memory = driver_memory
        self.start_timeout = start_timeout
        self.own_dir = base_dir is None
        self.dir = base_dir or tempfile.mkdtemp(prefix="tracecode-spark-")
        self.port = self.webui_port = 0
        self.worker_webui_ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        self.names: dict[int, str] = {}  # pid -> master, worker-0, ...

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    @property
    def webui(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    def _dir(self, *parts: str) -> str:
        path = os.path.join(self.dir, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def _daemon_env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        conf = self._dir("daemon-conf")  # empty: no site-wide spark-defaults.conf leaks in
        env.update({
            "SPARK_HOME": spark_home(), "SPARK_CONF_DIR": conf, "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_LOG_DIR": self._dir("logs"), "SPARK_LOCAL_DIRS": self._dir("local", name),
            # The daemons themselves are small; the executors get the worker's --memory.
            "SPARK_DAEMON_MEMORY": "256m",
        })
        # A driver's settings must not reach the daemons (they would apply them to themselves).
        for k in ("SPARK_MASTER_OPTS", "SPARK_WORKER_OPTS", "SPARK_DAEMON_JAVA_OPTS", "PYSPARK_SUBMIT_ARGS"):
            env.pop(k, None)
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self._dir("logs"), f"{name}.log"), "wb")
        # spark-class execs the JVM, so the pid is the JVM's; its own session makes the process
        # group the whole tree (a worker's executors, their Python workers) to stop at the end.
        proc = subprocess.Popen([os.path.join(spark_home(), "bin", "spark-class"), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=self._daemon_env(name), cwd=self.dir,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc

    def state(self) -> dict:
        """The master's own view (its web UI's JSON): workers, active and completed apps."""
        with urllib.request.urlopen(self.webui + "/json/", timeout=5) as r:
            return json.load(r)

    def worker_state(self, i: int) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.worker_webui_ports[i]}/json/", timeout=5) as r:
            return json.load(r)

    def start(self) -> SparkStandalone:
        if shutil.which("java") is None:
            raise RuntimeError("java is not on PATH: a Spark cluster needs it (scripts/system-deps.txt)")
        try:
            self.port, self.webui_port = _free_port(), _free_port()
            self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--webui-port", str(self.webui_port)])
            self._wait(lambda s: True, "the master's web UI")
            for i in range(self.n_workers):
                ui = _free_port()
                self.worker_webui_ports.append(ui)
                self._spawn(f"worker-{i}", ["org.apache.spark.deploy.worker.Worker", self.master_url,
                                            "--host", "127.0.0.1", "--webui-port", str(ui),
                                            "--cores", str(self.cores), "--memory", self.memory,
                                            "--work-dir", self._dir("work", f"worker-{i}")])
            self._wait(lambda s: sum(w.get("state") == "ALIVE" for w in s.get("workers", [])) >= self.n_workers,
                       f"{self.n_workers} workers registered")
        except BaseException:
            self.stop()
            raise
        conf = self._dir("client-conf")
        with open(os.path.join(conf, "spark-defaults.conf"), "w", encoding="utf-8") as fh:
            fh.write(f"spark.driver.memory {self.driver_memory}\n")
        return self

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Spark daemon exited ({self.names[dead[0].pid]}, code {dead[0].returncode}) "
                                   f"while waiting for {what}: {self.log_tail()}")
            try:
                if ready(self.state()):
                    return
            except OSError as exc:  # not listening yet
                last = exc
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what} ({last}): {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for name in sorted(os.listdir(self._dir("logs"))):
            with open(os.path.join(self._dir("logs"), name), "rb") as fh:
                out.append(f"--- {name}\n" + fh.read().decode("utf-8", "replace")[-chars:])
        return "\n".join(out)

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update({"SPARK_HOME": spark_home(), "SPARK_CONF_DIR": self._dir("client-conf"),
                    "SPARK_LOCAL_IP": "127.0.0.1"})
        return env

    def stop(self) -> None:
        """SIGTERM to every process of the trees started here (workers first, so they do not
        restart executors), then SIGKILL to what is left; nothing else is touched."""
        procs = list(reversed(self.procs))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                pids = process_tree(p.pid) if p.poll() is None else []
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    os.killpg(p.pid, sig)  # the tree's strays (reparented children) too
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + 15
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in procs):
                break
        self.procs = []
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SparkStandalone:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
