"""Fixtures of the console tests: a real PostgreSQL the tests start themselves (initdb + pg_ctl
in a temp dir, a free loopback port; never the machine's own server), Django configured on it,
a real redis-server and tracecode gRPC server, and helpers to start the console as a process.

Django is configured once per test process (its settings are global), so every console test
shares one database; tests keep apart by their own users, subjects and regions.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from itertools import count

import pytest

from tracecode.server.store import RedisProcess, free_port
from tracecode.rules.pseudonym import generate_key_file

ARTIFACTS = os.environ.get("TRACECODE_TEST_ARTIFACTS",
                           os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts"))
_names = count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{next(_names)}"


def _pg_bin(name: str) -> str:
    found = shutil.which(name) if name != "initdb" else None
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    path = candidates[-1] if candidates else (found or shutil.which(name))
    if not path:
        raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's postgresql (bash scripts/test does)")
    return path


class PostgresProcess:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, data and socket in a temp dir.
    As root it runs as the `postgres` system user (the server refuses to run as root)."""

    def __init__(self):
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="tracecode-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.log = os.path.join(self.tmp, "server.log")
        self.user = "console"
        self.db = "ledger"
        self._as = []
        if os.geteuid() == 0:
            account = "postgres"
            try:
                pw = pwd.getpwnam(account)
            except KeyError:
                pw = pwd.getpwnam("nobody")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            self._as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.db}"

    def _run(self, *argv):
        subprocess.run([*self._as, *argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.tmp)

    def start(self) -> "PostgresProcess":
        self._run(_pg_bin("initdb"), "-D", self.data, "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        opts = (f"-p {self.port} -k {self.tmp} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        self._run(_pg_bin("pg_ctl"), "-D", self.data, "-o", opts, "-l", self.log, "-w", "-t", "60", "start")
        self._run(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.db)
        return self

    def dump(self) -> str:
        """The whole database as SQL text (pg_dump): for "this value is stored nowhere" checks."""
        out = subprocess.run([*self._as, _pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                              self.user, self.db], check=True, capture_output=True, cwd=self.tmp)
        return out.stdout.decode("utf-8")

    def stop(self) -> None:
        try:
            self._run(_pg_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class ConsoleEnv:
    env: dict[str, str]
    data_dir: str
    key_file: str
    pg: PostgresProcess


_shared: dict[str, object] = {}


def _once(name, start, stop):
    """One instance per test process. The fixtures below are imported by several test modules,
    and pytest makes a session fixture imported into two modules two fixtures: without this they
    would start two PostgreSQL servers while Django (configured once) talks to the first."""
    if name not in _shared:
        _shared[name] = start()
        atexit.register(stop, _shared[name])
    return _shared[name]


def _start_console_env() -> ConsoleEnv:
    pg = PostgresProcess().start()
    data = tempfile.mkdtemp(prefix="tracecode-console-")
    key = generate_key_file(os.path.join(data, "pseudonym.key"))
    env = {"TRACECODE_CONSOLE_DATABASE_URL": pg.url, "TRACECODE_CONSOLE_DATA_DIR": data,
           "TRACECODE_PSEUDONYM_KEY_FILE": key, "TRACECODE_CONSOLE_SECRET_KEY": "test-" + "k" * 50,
           "TRACECODE_CONSOLE_RETRY_INTERVAL_S": "0.5", "DJANGO_SETTINGS_MODULE": "tracecode.console.settings"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import django
        django.setup()  # reads the settings now, once for the process
        from django.core.management import call_command
        call_command("migrate", interactive=False, verbosity=0)
    except BaseException:
        pg.stop()
        raise
    # The rest of the suite (servers it starts as processes read TRACECODE_* too) sees the
    # environment it had; console processes get `env` explicitly.
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return ConsoleEnv(env, data, key, pg)


def _stop_console_env(ce: ConsoleEnv) -> None:
    from django.db import connections
    connections.close_all()
    ce.pg.stop()
    shutil.rmtree(ce.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def console_env():
    return _once("console_env", _start_console_env, _stop_console_env)


@dataclass
class Service:
    target: str
    redis: RedisProcess
    prefix: str
    server: object


@pytest.fixture(scope="session")
def console_redis():
    return _once("console_redis", lambda: RedisProcess(port=free_port(), appendonly=False).start(),
                 lambda proc: proc.stop())


@pytest.fixture
def service(console_env, console_redis):
    """A tracecode gRPC server on loopback (own key prefix) that the console is pointed at."""
    from django.conf import settings

    from tracecode.console.ledger import gateway, packs
    from tracecode.server.app import Server, make_store
    from tracecode.server.config import Config

    prefix = unique("c")
    # The console and the server share the deployment's pseudonym key: one person, one pseudonym.
    cfg = Config(listen="127.0.0.1:0", metrics_port=0, key_prefix=prefix, threads=8, grace_s=0.5,
                 pseudonym_key_file=console_env.key_file)
    store = make_store(cfg, console_redis.url)
    srv = Server(cfg, store).start()
    target = f"127.0.0.1:{srv.port}"
    settings.TRACECODE_SERVER = target
    gateway.reset_client()
    packs.reset_client()
    try:
        yield Service(target, console_redis, prefix, srv)
    finally:
        srv.stop(0)
        store.close()
        gateway.reset_client()
        packs.reset_client()


def make_user(role: str, name: str | None = None):
    from tracecode.console.ledger.roles import make_user as mk
    name = name or unique(role[:3])
    user = mk(name, f"pw-{name}-long-enough", role)
    user.raw_password = f"pw-{name}-long-enough"
    return user


def http(user=None):
    """A Django test client (the whole HTTP stack: URLs, middleware, sessions, views), logged in."""
    from django.test import Client
    c = Client(HTTP_HOST="127.0.0.1")
    if user is not None:
        assert c.login(username=user.username, password=user.raw_password)
    return c


def free_tcp_port() -> int:
    return free_port()


class ConsoleProcess:
    """`tracecode console serve` as a real process on the test database."""

    def __init__(self, env: ConsoleEnv, service_target: str):
        self.port = free_port()
        self.env = {**os.environ, **env.env, "TRACECODE_CONSOLE_SERVER": service_target,
                    "TRACECODE_CONSOLE_RETRY_INTERVAL_S": "0.5"}
        self.proc = None
        self.log = tempfile.NamedTemporaryFile(prefix="console-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ConsoleProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "tracecode.console.cli", "serve", "--no-migrate",
                                      "--listen", f"127.0.0.1:{self.port}"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"console exited: {open(self.log.name).read()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/login/", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"console did not answer: {open(self.log.name).read()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def artifacts_dir() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS
