"""Helpers of the operations tests (test_ops_*.py): the Prometheus tools, /metrics scraping, and a
real `tracecode serve` child process. Fixtures stay in the test modules (conftest.py is shared)."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")


def tool(name: str) -> str:
    """Path of a Prometheus binary. Missing is a failure, not a skip: CI installs it (.ci/run)."""
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found on PATH: install Debian's prometheus package "
                    "(apt-get install prometheus), as scripts/test does")
    return path


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def scrape(port: int) -> str:
    return http_get(f"http://127.0.0.1:{port}/metrics")


class Samples:
    """One scrape, parsed by prometheus-client's own parser."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def get(self, name: str, **labels) -> float | None:
        """Value of the one sample `name` whose labels include `labels`, None when absent."""
        found = [s.value for s in self.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else None

    def value(self, name: str, **labels) -> float:
        v = self.get(name, **labels)
        return 0.0 if v is None else v


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ServeProcess:
    """`python -m tracecode.cli serve ARGS` as a child process; stdout is read for the
    ports it prints, stderr (the log) goes to a file."""

    def __init__(self, args: list[str], log_path: str, env: dict | None = None):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracecode.cli", "serve", *args],
            stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, **(env or {})}, cwd=ROOT)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self.metrics_port = None

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put(raw.decode().strip())
        self._lines.put(None)

    def wait_listening(self, timeout: float = 30.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while self.port is None:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                pytest.fail(f"tracecode serve did not start; log:\n{self.log()}")
            if line.startswith("tracecode metrics on port "):
                self.metrics_port = int(line.rsplit(" ", 1)[1])
            elif line.startswith("tracecode listening on port "):
                self.port = int(line.rsplit(" ", 1)[1])
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"tracecode serve did not exit within {timeout} s; log:\n{self.log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it hangs (a hang is a test failure elsewhere)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
