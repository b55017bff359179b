"""Shared fixtures: a real redis-server per test session on a free port, a real gRPC server on
loopback per test (each test in its own key prefix, so nothing is flushed), real clients."""
from __future__ import annotations

import itertools
import os

import pytest

from tracecode.server.app import Server, make_store
from tracecode.server.config import Config
from tracecode.server.store import RedisProcess, free_port
from redis_cluster import RedisClusterProcesses
from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient

# The ledger console's fixtures (PostgreSQL, Django, its own Redis and server): tests/console_support.py.
pytest_plugins = ["console_support"]

_prefixes = itertools.count(1)


# The whole verification suite runs against both a single redis-server and a real Redis Cluster
# (3 masters, 1 replica each): every guarantee must hold on both. TRACECODE_TEST_BACKENDS narrows
# the run (e.g. "standalone") while developing.
BACKENDS = os.environ.get("TRACECODE_TEST_BACKENDS", "standalone,cluster").split(",")

# Tests in which nothing backend-specific can differ (authentication, limits, metrics format,
# request decoding...) carry this mark (usually as a module's `pytestmark`): they run on the first
# backend of BACKENDS only (standalone by default), not once per backend. `all_backends` on a test
# inside such a module puts it back on every backend.
ONE_BACKEND = "backend_independent"
ALL_BACKENDS = "all_backends"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{ONE_BACKEND}: runs on one Redis backend only "
                                       "(nothing backend-specific can differ)")
    config.addinivalue_line("markers", f"{ALL_BACKENDS}: runs on every backend even in a "
                                       f"{ONE_BACKEND} module")


def pytest_generate_tests(metafunc):
    if "redis_server" not in metafunc.fixturenames:
        return
    node = metafunc.definition
    one = node.get_closest_marker(ONE_BACKEND) and not node.get_closest_marker(ALL_BACKENDS)
    metafunc.parametrize("redis_server", BACKENDS[:1] if one else BACKENDS, indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_server(request):
    if request.param == "cluster":
        proc = RedisClusterProcesses(masters=3, replicas=1).start()
        proc.cluster = True
    else:
        proc = RedisProcess(port=free_port(), appendonly=False).start()
        proc.cluster = False
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def pseudonym_key(tmp_path_factory):
    """The insured-pseudonym key file of the test deployment (every server of a test shares it)."""
    from tracecode.rules.pseudonym import generate_key_file
    return generate_key_file(str(tmp_path_factory.mktemp("pseudonym") / "pseudonym.key"))


@pytest.fixture
def config(redis_server, pseudonym_key):
    return Config(listen="127.0.0.1:0", metrics_port=0, key_prefix=f"t{os.getpid()}x{next(_prefixes)}",
                  threads=8, grace_s=1.0, redis_cluster=redis_server.cluster, pseudonym_key_file=pseudonym_key)


@pytest.fixture
def store(redis_server, config):
    s = make_store(config, redis_server.url)
    yield s
    s.close()


@pytest.fixture
def server(store, config):
    srv = Server(config, store).start()
    yield srv
    srv.stop(0)


@pytest.fixture
def target(server):
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def pos(target):
    with PosClient(target, deadline_s=5) as client:
        yield client


@pytest.fixture
def admin(target):
    client = AdminClient(target)
    yield client
    client.close()


@pytest.fixture
def make_server(redis_server, config):
    """Start another server over the same Redis and prefix with config overrides."""
    started = []

    def make(**overrides):
        cfg = config.replace(**overrides)
        st = make_store(cfg, redis_server.url)
        srv = Server(cfg, st).start()
        started.append((srv, st))
        return f"127.0.0.1:{srv.port}"

    yield make
    for srv, st in started:
        srv.stop(0)
        st.close()
