"""Races over real gRPC and Redis: the check and the mark of a pack are one atomic step, so
concurrent settlements of one pack cannot both take it, and a split pack never gives out more units
than it holds. Threads start together behind a barrier to maximise the overlap."""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from tracecode.clients.pos import PosClient, line

from factories import cn20, issuance, load
from helpers import verdicts

P = "8123456"


def run_together(n: int, fn) -> list:
    """Call fn(i) for i in range(n) on n threads released at the same moment."""
    barrier = threading.Barrier(n)

    def task(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(task, range(n)))


def test_200_clients_at_50_sites_race_for_one_whole_pack(target, admin, pos):
    code = cn20()
    load(admin, issuance(code, P))
    sites = [f"RACE-{s:02d}" for s in range(50)]
    # One channel per site (4 POS terminals of a site share their pharmacy's connection).
    channels = [grpc.insecure_channel(target) for _ in sites]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=10)
        clients = [PosClient(ch, deadline_s=30) for ch in channels]

        def settle(i):
            site = i % 50
            return clients[site].verify(sites[site], [line(code, P)], settlement_id=f"race-{i}")

        results = run_together(200, settle)
    finally:
        for ch in channels:
            ch.close()
    counts = Counter(verdicts(r)[0] for r in results)
    assert counts == {"OK": 1, "DUPLICATE": 199}
    (winner,) = [i for i, r in enumerate(results) if r.recorded]
    # Every loser names the winner as the first dispense.
    firsts = {(r.results[0].evidence.first_site_id, r.results[0].evidence.first_settlement_id)
              for r in results if not r.recorded}
    assert firsts == {(sites[winner % 50], f"race-{winner}")}
    hist = pos.history(code)
    assert hist.units_used == 1
    assert hist.first_dispense.attempts == 199
    assert Counter(e.type for e in hist.events) == {1: 1, 2: 199}  # DISPENSED, DUPLICATE_ATTEMPT
    # Each attempt got its own count: 1..199, none lost to a race.
    assert sorted(r.results[0].evidence.attempts for r in results if not r.recorded) == list(range(1, 200))


def test_40_one_unit_lines_race_for_a_split_pack_of_10(target, admin, pos):
    code = cn20()
    load(admin, issuance(code, P, pack_units=10))
    channels = [grpc.insecure_channel(target) for _ in range(8)]
    try:
        clients = [PosClient(ch, deadline_s=30) for ch in channels]

        def settle(i):
            return clients[i % 8].verify("SPLIT-SITE", [line(code, P, 1)], settlement_id=f"split-{i}")

        results = run_together(40, settle)
    finally:
        for ch in channels:
            ch.close()
    counts = Counter(verdicts(r)[0] for r in results)
    assert counts == {"OK": 10, "QUANTITY_EXCEEDED": 30}
    assert sum(r.results[0].units_accepted for r in results) == 10
    hist = pos.history(code)
    assert hist.units_used == 10
    assert sum(e.units for e in hist.events if e.type == 1) == 10
