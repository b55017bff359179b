"""Graceful shutdown of a real `tracecode serve` process: SIGTERM in the middle of concurrent
settlements answers every call and loses no acknowledged settlement; SIGINT stops the embedded
Redis cleanly with its data on disk."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import grpc
import pytest

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.app import make_store
from tracecode.server.config import Config
from tracecode.server.store import RedisProcess, free_port

from factories import cn20, issuance, load
from ops_support import ServeProcess, scrape, wait_for

THREADS, PER_THREAD, LINES = 8, 30, 25


def load_codes(target: str, n: int) -> list[str]:
    codes = [cn20() for _ in range(n)]
    admin = AdminClient(target)
    try:
        load(admin, *(issuance(c, "8123456") for c in codes))
    finally:
        admin.close()
    return codes


def test_sigterm_under_load_answers_every_call_and_loses_no_acknowledged_settlement(tmp_path):
    redis = RedisProcess(str(tmp_path / "redis"), port=free_port(), appendonly=False).start()
    # Settings from all three sources: file (prefix, grace), environment (JSON logs), flags.
    conf = tmp_path / "tracecode.toml"
    conf.write_text('key_prefix = "sigterm"\ngrace_s = 8.0\nthreads = 8\n')
    served = ServeProcess(["--config", str(conf), "--listen", "127.0.0.1:0", "--redis-url", redis.url,
                           "--metrics-port", str(free_port())],
                          str(tmp_path / "serve.log"), env={"TRACECODE_LOG_JSON": "true"})
    try:
        served.wait_listening()
        codes = load_codes(served.target, THREADS * PER_THREAD * LINES)
        plans = [[(f"SITE-{t}", f"s{t}-{i}", codes[(t * PER_THREAD + i) * LINES:(t * PER_THREAD + i + 1) * LINES])
                  for i in range(PER_THREAD)] for t in range(THREADS)]
        results: list[tuple] = []  # (site, settlement id, codes, status, response, started, ended)
        lock = threading.Lock()
        go = threading.Event()

        def pharmacy(plan):
            # No client retries: each call's own fate is what is measured.
            with PosClient(served.target, deadline_s=20, retries=0) as pos:
                go.wait()
                for site, sid, cs in plan:
                    started = time.monotonic()
                    try:
                        resp = pos.verify(site, [line(c, "8123456") for c in cs], settlement_id=sid)
                        status = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        resp, status = None, exc.code()
                    with lock:
                        results.append((site, sid, cs, status, resp, started, time.monotonic()))
                    if status != grpc.StatusCode.OK:
                        return  # the server is going away

        threads = [threading.Thread(target=pharmacy, args=(p,)) for p in plans]
        for t in threads:
            t.start()
        go.set()
        wait_for(lambda: len(results) >= 2 * THREADS, 30, "the load to be under way")
        sigterm_at = time.monotonic()
        served.signal(signal.SIGTERM)
        assert served.wait(30) == 0
        exited_at = time.monotonic()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a call never got an answer"

        # Every call got an answer: OK, or UNAVAILABLE for calls the draining server refused.
        # Never CANCELLED / DEADLINE_EXCEEDED, which is what an in-flight call cut off would get.
        statuses = {r[3] for r in results}
        assert statuses <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, statuses
        ok = [r for r in results if r[3] == grpc.StatusCode.OK]
        refused = [r for r in results if r[3] != grpc.StatusCode.OK]
        assert all(r[4].recorded and len(r[4].results) == LINES for r in ok)
        # Settlements in flight when SIGTERM arrived were finished and answered.
        in_flight = [r for r in ok if r[5] < sigterm_at < r[6]]
        assert in_flight, "no settlement was in flight at SIGTERM: the test measured nothing"
        assert exited_at - sigterm_at < 8.0, "drain took the whole grace period"

        # Read back from Redis, under the key prefix set by the config file.
        store = make_store(Config(key_prefix="sigterm"), redis.url)
        try:
            for site, sid, cs, _, _resp, *_ in ok:
                assert store.stored_settlement(site, sid) is not None, (site, sid)
                for c in cs[:3] + cs[-1:]:
                    h = store.code_history(c)
                    assert (h.first_site_id, h.first_settlement_id) == (site, sid)
            # A refused call did nothing: its packs were never dispensed.
            for site, sid, cs, *_ in refused:
                assert store.stored_settlement(site, sid) is None
                assert not store.code_history(cs[0]).first_site_id
        finally:
            store.close()

        # The log: JSON (from the environment), the drain announced, the end reached.
        docs = [json.loads(x) for x in served.log().splitlines() if x.strip()]
        msgs = [d["msg"] for d in docs]
        assert any(m.startswith("signal SIGTERM: draining (grace 8.0 s)") for m in msgs), msgs
        assert msgs[-1] == "tracecode stopped"
    finally:
        served.close()
        redis.stop()


def test_sigint_stops_the_embedded_redis_cleanly_with_the_data_on_disk(tmp_path):
    data = tmp_path / "data"
    served = ServeProcess(["--listen", "127.0.0.1:0", "--data-dir", str(data), "--metrics-port", str(free_port()),
                           "--redis-appendfsync", "everysec", "--key-prefix", "sigint"], str(tmp_path / "serve.log"))
    try:
        served.wait_listening()
        assert "tracecode_redis_up 1.0" in wait_for(
            lambda: (lambda t: t if "tracecode_redis_up 1.0" in t else None)(scrape(served.metrics_port)), 5,
            "redis up")
        pid = int(re.search(r"embedded redis-server pid (\d+)", served.log()).group(1))
        code = load_codes(served.target, 1)[0]
        with PosClient(served.target, deadline_s=5) as pos:
            assert pos.verify("SITE-E", [line(code, "8123456")], settlement_id="kept-1").recorded
        served.signal(signal.SIGINT)
        assert served.wait(30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the embedded redis-server is gone, not orphaned
        assert "embedded redis-server stopped" in served.log()
    finally:
        served.close()
    # Its AOF has the settlement: a new redis-server on the same directory serves it back.
    with RedisProcess(str(data), appendonly=True) as again:
        store = make_store(Config(key_prefix="sigint"), again.url)
        try:
            assert store.stored_settlement("SITE-E", "kept-1") is not None
            assert store.code_history(code).first_settlement_id == "kept-1"
        finally:
            store.close()
