"""The Store: every Redis operation of the service.

Every operation a verdict depends on is one Lua script call (loaded once, called by SHA), so the
check and the mark of a code are atomic and a settlement costs one round trip, whatever its size.
The scripts live in server/lua/; the key layout in keys.py.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator, Sequence

import hiredis
import redis

from tracecode.codec import wire

from ..errors import (BadLineIndex, SettlementConflict, SettlementNotFound, StoreUnavailable,
                     from_script_error)
from ..failpoints import failpoint
from .embedded import LISTPACK_CONFIG
from .keys import KeySpace, slot_of
from .layout import ENTRY_FIELDS, LOT_FIELDS, US, VERIFY_ARGV, lua_layout, lua_row_text
from .types import (CodeEvent, CodeHistory, IssuanceRecord, ScriptRow, SettlementCall,
                    SettlementResult)
from redis.crc import key_slot
from ..verdicts import lua_precedence

log = logging.getLogger("tracecode.store")


def script_text(name: str, layout: int = 2) -> str:
    """A script's text with its shared parts spliced in. Layout 1's own scripts are in lua/v1/
    (frozen); the scripts both layouts share (gate, claim, decide, sanction) are in lua/."""
    lua = resources.files("tracecode.server.store").joinpath("lua")
    own = lua.joinpath("v1") if layout == 1 else lua
    source = own if own.joinpath(name).is_file() else lua
    text = source.joinpath(name).read_text()
    if name == "verify.lua":  # judged inside the sanction gate, in the same call (lua/gate.lua)
        text = lua.joinpath("gate.lua").read_text().replace("--@VERIFY@--", text)
    if "--@HISTORY@--" in text:  # layout 1
        text = text.replace("--@HISTORY@--", lua.joinpath("v1", "_history.lua").read_text())
    text = text.replace("--@STATE@--", lua.joinpath("_state.lua").read_text().replace("--@ROWTEXT@--", lua_row_text()))
    text = text.replace("--@LAYOUT@--", lua_layout())
    return text.replace("--@PRECEDENCE@--", lua_precedence())


@dataclass(frozen=True)
class StoreLimits:
    audit_max: int = 1_000_000  # per audit stream (there are keys.BUCKETS of them); approximate trim
    history_max: int = 256  # events kept per code; the total is counted past it
    settlement_ttl_s: int = 40 * 86400  # idempotency record and return ledger lifetime (config.py)
    reservation_ms: int = 30_000  # cluster ALL_OR_NOTHING: how long prepared units stay reserved
    # Durability across failover: a write is acknowledged only once this many replicas have it
    # (WAIT after the write; 0 = asynchronous replication, Redis's default).
    min_replicas_acked: int = 0
    replica_ack_timeout_ms: int = 500


# Layout 1's issuance hash field -> public name.
_ISSUANCE_FIELDS = (("p", "product_id"), ("g", "gtin"), ("b", "batch"), ("e", "expiry"),
                    ("n", "pack_units"), ("m", "manufacturer"), ("s", "status"))
# Layout 2's entry and lot positions (layout.py), 0-based.
_E = {f: i for i, f in enumerate(ENTRY_FIELDS)}
_LOT = {f: i for i, f in enumerate(LOT_FIELDS)}


# Failures after which the same call may succeed: Redis down, restarting, or a cluster between
# topologies (failover). Every store write is idempotent, so the caller may simply retry.
# READONLY: the node a kept connection talks to was demoted to a replica by a failover (its
# script fails at its first write, so nothing was written); MASTERDOWN: a replica cut off from
# its master; OOM: Redis at maxmemory refuses writes until memory is freed; NOSCRIPT after the
# scripts were just loaded again: the node serving the slot changed in between (failover).
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
                redis.exceptions.TryAgainError, redis.exceptions.RedisClusterException,
                redis.exceptions.AskError, redis.exceptions.ReadOnlyError,
                redis.exceptions.MasterDownError, redis.exceptions.OutOfMemoryError,
                redis.exceptions.NoScriptError)
# The same for errors redis-py leaves as a plain ResponseError, by their Redis error code:
# BUSY (a script over its time limit), NOREPLICAS (min-replicas-to-write not met).
_UNAVAILABLE_CODES = ("BUSY ", "NOREPLICAS ")
# Answers that mean "this slot is served elsewhere now": refresh the topology and send again.
_MOVED = (redis.exceptions.AskError, redis.exceptions.ReadOnlyError)


def _unavailable(error) -> bool:
    """Whether a redis-py error (raised, or a reply in a pipeline) means "retry later"."""
    return isinstance(error, _UNAVAILABLE) or (
        isinstance(error, redis.ResponseError) and str(error).startswith(_UNAVAILABLE_CODES))


def _wrap_errors(fn):
    """Translate redis-py failures into store errors at the boundary, once: "retry later" answers
    into StoreUnavailable, a script's own TC... error into its domain error (errors.py registry)."""
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            if _unavailable(exc):
                raise StoreUnavailable(f"redis unavailable: {exc}") from exc
            domain = from_script_error(str(exc)) if isinstance(exc, redis.ResponseError) else None
            if domain is None:
                raise
            raise domain from None
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


# The store's other modules (store/sanctions.py) translate their errors the same way.
wrap_errors = _wrap_errors


def _pack(commands: Sequence[tuple]) -> bytes:
    """The RESP bytes of a pipeline of commands (hiredis.pack_command, in C)."""
    return b"".join([hiredis.pack_command(c) for c in commands])


def _stored_results(text: str, site: str, settlement_id: str, at_ms: int) -> tuple[bool, list[ScriptRow]]:
    """A settlement's results as verify.lua and commit.lua answer and store them (layout.py):
    packed, a first dispense that is the settlement's own written '=', '', '' (so the site, id and
    time of the settlement complete them); or the JSON of layout 1 (records stored before the
    migration). Decoded by tracecode.codec.wire (compiled; tests/test_wire.py holds it to this)."""
    return wire.decode_results(text, ScriptRow, (site, settlement_id, at_ms))


def _decode(reply: list, call: SettlementCall) -> SettlementResult:
    """A verify.lua answer {replayed, results, part state[, sanctions json]} to `call`, decoded
    once, here. The 4th element: the sanction entries gate.lua found binding a check (json)."""
    recorded, rows = _stored_results(reply[1], call.site, call.settlement_id, call.settled_at_ms)
    sx = json.loads(reply[3]) if len(reply) > 3 else []
    return SettlementResult(bool(reply[0]), recorded, rows, sx)


@dataclass
class PreparedBatch:
    """verify_batch's input with the CPU work done (Store.prepare_batch)."""
    calls: list  # the SettlementCalls
    batch: list | None  # one node: (script, keys, args) per call
    wire: bytes | None  # one node: the pipeline's bytes


class _HeldConnection:
    """A pool connection one thread keeps for its calls; given back when the thread ends (its
    thread-local dict is dropped then)."""
    __slots__ = ("pool", "conn")

    def __init__(self, pool):
        self.pool = pool
        self.conn = pool.get_connection()

    def __del__(self):
        try:
            self.pool.release(self.conn)
        except Exception:  # noqa: BLE001 - interpreter shutdown; nothing left to give back to
            pass


_held = threading.local()


def _connection(pool):
    """This thread's connection to `pool`. Each thread keeps one instead of taking one from the
    pool and giving it back per call: redis-py's get/release cost a lock, bookkeeping and a
    poll() system call each time, which on the POS path is more than the call's own packing."""
    conns = getattr(_held, "conns", None)
    if conns is None:
        conns = _held.conns = {}
    held = conns.get(id(pool))
    if held is None or held.pool is not pool:
        held = conns[id(pool)] = _HeldConnection(pool)
    return held.conn


def _pipeline(client: redis.Redis, n: int, packed: bytes) -> list:
    """Send n packed commands on this thread's connection in one write and read their replies in
    order; a command's own error comes back in its place. The hot path of every settlement:
    redis-py's Pipeline does the same with several Python calls per command (options, callbacks,
    packing one command at a time), which cost more than a 5-code settlement's Lua on a loaded
    server (benchmarks/run.py). The wire bytes come from hiredis.pack_command (C).

    A connection that fails is closed (it reconnects on next use) and the batch sent once more:
    a kept socket may have died with a Redis restart, and every script here is idempotent."""
    conn = _connection(client.connection_pool)
    for attempt in (0, 1):
        try:
            conn.send_packed_command([packed])
            replies = []
            for _ in range(n):
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        except redis.ConnectionError:
            conn.disconnect()
            if attempt:
                raise
        except BaseException:
            conn.disconnect()  # a timeout or an interrupt mid-reply: the socket's state is unknown
            raise
    raise AssertionError("unreachable")


class Store:
    def __init__(self, client, keys: KeySpace | None = None, limits: StoreLimits | None = None,
                 cluster: bool = False):
        self.r = client
        self.cluster = cluster
        self.keys = keys or KeySpace()
        self.layout = self.keys.layout
        self.limits = limits or StoreLimits()
        names = ["verify", "reverse", "issue", "status", "commit", "claim", "decide", "sanction"]
        if self.layout == 2:
            names += ["read", "migrate", "prune"]
        self._scripts = {name: client.register_script(script_text(f"{name}.lua", self.layout)) for name in names}
        self._verify = self._scripts["verify"]
        self._reverse = self._scripts["reverse"]
        self._issue = self._scripts["issue"]
        self._status = self._scripts["status"]
        self._commit = self._scripts["commit"]
        self._claim = self._scripts["claim"]
        self._decide = self._scripts["decide"]

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0, max_connections: int = 64,
                 cluster: bool = False, **kw) -> "Store":
        common = dict(decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                      max_connections=max_connections)
        if cluster:
            from redis.cluster import RedisCluster
            client: redis.Redis | RedisCluster = RedisCluster.from_url(url, **common)
        else:
            client = redis.Redis.from_url(url, health_check_interval=30, **common)
        return cls(client, cluster=cluster, **kw)

    def close(self) -> None:
        self.r.close()

    @_wrap_errors
    def ping(self) -> bool:
        if self.cluster:
            # Every slot must be served: a cluster that lost a master without failover is down.
            info = self.r.cluster_info()
            return info.get("cluster_state") == "ok"
        return bool(self.r.ping())

    def config_warnings(self) -> list[str]:
        """What in the Redis server's configuration costs layout 2 memory (never correctness):
        hashes above the listpack limits are kept as hashtables, ~70 bytes more per code."""
        if self.layout != 2:
            return ["store_layout = 1: a layout kept only for migration; run `tracecode migrate-layout`"]
        want = dict(zip(LISTPACK_CONFIG[0::2], LISTPACK_CONFIG[1::2]))
        try:
            node = self.r.get_redis_connection(self.r.get_primaries()[0]) if self.cluster else self.r
            got = node.config_get("hash-max-listpack-*")
        except redis.RedisError as exc:  # CONFIG is often disabled on managed Redis
            return [f"cannot read the Redis configuration ({exc}); layout 2 needs {LISTPACK_CONFIG}"]
        low = [f"{k.lstrip('-')} is {got.get(k.lstrip('-'))} (want >= {v})" for k, v in want.items()
               if int(got.get(k.lstrip("-"), 0) or 0) < int(v)]
        return [f"Redis {', '.join(low)}: codes will take more memory (docs/scaling.md)"] if low else []

    # ------------------------------------------------------------------ script calls

    def _load_scripts(self) -> None:
        """(Re)load every script; on a cluster on every master. Redis 7 keeps no script cache
        across restarts or failovers, so a NOSCRIPT answer leads here once."""
        clients = ([self.r.get_redis_connection(n) for n in self.r.get_primaries()] if self.cluster
                   else [self.r])
        for client in clients:
            for script in self._scripts.values():
                client.script_load(script.script)

    def _call(self, script, keys: Sequence[str], args: Sequence, *, durable: bool = False) -> Any:
        """One script call, one round trip."""
        res = self._run([(script, keys, args)], durable=durable)[0]
        if isinstance(res, Exception):
            raise res
        return res

    def _node_groups(self, calls: Sequence[tuple]) -> list[tuple[redis.Redis, list[int]]]:
        """Cluster: the calls grouped by the master serving their keys' slot. Routing here, from
        the first key's hash tag, spares redis-py's cluster pipeline a COMMAND GETKEYS round trip
        per script call."""
        if not self.cluster:
            return [(self.r, list(range(len(calls))))]
        groups: dict[str, tuple[redis.Redis, list[int]]] = {}
        nodes = self.r.nodes_manager
        for p, (_, keys, _) in enumerate(calls):
            node = nodes.get_node_from_slot(key_slot(keys[0].encode()))
            groups.setdefault(node.name, (self.r.get_redis_connection(node), []))[1].append(p)
        return list(groups.values())

    def _run(self, calls: Sequence[tuple], *, durable: bool = False, wire: bytes | None = None) -> list:
        """Many script calls (script, keys, args) pipelined: one round trip (one per master on a
        cluster), executed in order per node. A script's own error comes back in its place.
        Every script is idempotent, so calls may be sent again after a NOSCRIPT or a MOVED
        (a failover or resharding): the topology is refreshed and the batch retried once.

        durable: with min_replicas_acked, each node's pipeline ends with WAIT on the same
        connection (WAIT counts the replicas that have this connection's writes); fewer replicas
        than asked is UNAVAILABLE and the caller retries with the same id. This is what makes an
        acknowledged dispense survive the loss of its master."""
        need = self.limits.min_replicas_acked if durable else 0
        for attempt in (0, 1):
            results: list = [None] * len(calls)
            try:
                for client, positions in self._node_groups(calls):
                    if wire is not None and attempt == 0 and not need:
                        # Packed ahead (prepare_batch): exactly these commands on this one node.
                        replies = _pipeline(client, len(positions), wire)
                    else:
                        commands = []
                        for p in positions:
                            script, keys, args = calls[p]
                            commands.append(("EVALSHA", script.sha, len(keys), *keys, *args))
                        if need:
                            commands.append(("WAIT", need, self.limits.replica_ack_timeout_ms))
                        replies = _pipeline(client, len(commands), _pack(commands))
                    for p, r in zip(positions, replies):
                        results[p] = r
                    if need:
                        acked = replies[-1]
                        may_have_written = any(not isinstance(r, Exception) for r in replies[:-1])
                        # A WAIT that failed (e.g. the node is a replica now) confirms nothing: if a
                        # script may have written, the write is not acknowledged. If every script
                        # failed, their own errors decide below (READONLY: refresh and resend).
                        if isinstance(acked, Exception) and may_have_written:
                            raise StoreUnavailable(f"replica acknowledgement failed: {acked}; "
                                                   "retry with the same settlement id")
                        if not isinstance(acked, Exception) and acked < need:
                            raise StoreUnavailable(
                                f"write reached {acked} of {need} replica(s) within "
                                f"{self.limits.replica_ack_timeout_ms} ms; retry with the same settlement id")
            except _UNAVAILABLE:
                self._refresh_topology()
                raise
            if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # A node without our scripts is a restarted or newly promoted one: on a cluster
                # ask who the masters are now before loading them there.
                self._refresh_topology()
                self._load_scripts()
                continue
            if attempt == 0 and self.cluster and any(isinstance(r, _MOVED) for r in results):
                self._refresh_topology()
                continue
            for r in results:
                if _unavailable(r):
                    raise r
            return results
        raise AssertionError("unreachable")

    def _refresh_topology(self) -> None:
        """After a node failed or answered MOVED: ask the cluster who serves which slots now.
        During a failover this may fail too; the next call tries again."""
        if self.cluster:
            try:
                self.r.nodes_manager.initialize()
            except Exception as exc:  # noqa: BLE001 - any failure here means "still switching"
                log.info("cluster topology refresh failed (%s); will retry on the next call", exc)

    # ------------------------------------------------------------------ settlements

    def _parts(self, call: SettlementCall) -> list[tuple[str, list, list[int], list[str]]]:
        """Split a settlement into parts that one script call can judge atomically:
        [(record key, lines, line indexes, codes)]. On one node a single part, recorded under
        the settlement's key. On a cluster one part per hash slot, recorded in that slot;
        malformed lines (which touch no key) ride with the first part."""
        sk = call.state or self.keys
        site, sid, lines, codes = call.site, call.settlement_id, call.lines, call.codes
        if not self.cluster:
            return [(sk.settlement(site, sid), list(lines), list(range(len(lines))), list(codes))]
        by_slot: dict[int, list[int]] = {}
        for u, code in enumerate(codes, 1):
            by_slot.setdefault(slot_of(code), []).append(u)
        groups = list(by_slot.values()) or [[]]
        local = {}
        for g in groups:
            for j, u in enumerate(g, 1):
                local[u] = (g, j)
        parts = []
        for g in groups:
            part_lines, idx = [], []
            for i, (u, product, units, reason) in enumerate(lines):
                if (u and local[u][0] is g) or (not u and g is groups[0]):
                    part_lines.append((local[u][1] if u else 0, product, units, reason))
                    idx.append(i)
            first = codes[g[0] - 1] if g else f"{site}:{sid}"
            parts.append((sk.settlement_part(site, sid, first), part_lines, idx, [codes[u - 1] for u in g]))
        return parts

    def _verify_keys_args(self, call: SettlementCall, mode: str, record: str, lines, idx, codes) -> tuple[list, list]:
        """KEYS and ARGV of one verify.lua call (layout documented in the script).

        `state`, when given, holds the dispense state, history, settlement records and audit of a
        separate namespace (a bulk REPLAY job); issuance is always read from the live keys. Both
        share hash tags, so they stay in one slot. A separate namespace logs no events."""
        state = call.state
        sk = state or self.keys
        keys = [record, sk.audit_for(record)]
        for code in codes:
            keys += self.keys.code_keys(code, sk)
        if state and mode != "C":
            keys.append(sk.registry_for(record))  # what the call writes is registered for the drop
        lim = self.limits
        state_ttl = call.state_ttl_s
        if mode == "P":
            state_ttl = lim.reservation_ms
        fixed = {"mode": mode, "site": call.site, "settlement_id": call.settlement_id,
                 "settled_at_ms": call.settled_at_ms, "settle_day": call.settle_day, "digest": call.digest,
                 "policy": "A" if call.all_or_nothing else "R", "audit_max": 0 if state else lim.audit_max,
                 "history_max": lim.history_max, "settlement_ttl_s": call.state_ttl_s or lim.settlement_ttl_s,
                 "n_lines": len(lines), "state_ttl": state_ttl, "reserved": 0}
        # lua/gate.lua's tail: the sanction index keys it reads (on one node only), the insured
        # pseudonym, the gate mode, the number of those keys.
        gate = call.gate if not self.cluster and not state else ""
        gate_keys = []
        if gate:
            gate_keys.append(self.keys.sanction(f"site:{call.site}"))
            if call.insured:
                gate_keys.append(self.keys.sanction(f"ins:{call.insured}"))
        keys += gate_keys
        # ARGV: the fixed values, per line a PlanLine (LINE_FIELDS but the last) and its
        # line_index (the last of LINE_FIELDS), the codes, the gate's tail; built in one
        # compiled call (tracecode.codec.wire.verify_argv).
        args = wire.verify_argv([fixed[f] for f in VERIFY_ARGV], lines, idx, codes,
                                (call.insured, gate, len(gate_keys)))
        return keys, args

    def _verify_call(self, call: SettlementCall) -> tuple[list, list]:
        """KEYS and ARGV of a single-part settlement (one node); the benchmarks use it too."""
        ((record, lines, idx, codes),) = self._parts(call)
        return self._verify_keys_args(call, "D" if call.dispense else "C", record, lines, idx, codes)

    @_wrap_errors
    def verify(self, call: SettlementCall) -> SettlementResult:
        """Judge (and when `call.dispense`, mark) one settlement: one round trip on one node (one
        per slot touched on a cluster), decoded into one ScriptRow per line."""
        if self.cluster:
            out = self._verify_sharded([call])[0]
            if isinstance(out, Exception):
                raise out
            return out
        keys, args = self._verify_call(call)
        return _decode(self._call(self._verify, keys, args, durable=call.dispense and not call.state), call)

    def prepare_batch(self, calls: Sequence[SettlementCall]) -> "PreparedBatch":
        """The CPU half of verify_batch: every call's KEYS, ARGV and (on one node) the pipeline's
        wire bytes. A bulk job does this for chunk N+1 while Redis runs chunk N, so Redis does
        not wait for Python between chunks."""
        if self.cluster:  # routed and split per slot at run time (the topology may change)
            return PreparedBatch(list(calls), None, None)
        batch = []
        for call in calls:
            keys, args = self._verify_call(call)
            batch.append((self._verify, keys, args))
        return PreparedBatch(list(calls), batch, _pack([("EVALSHA", self._verify.sha, len(k), *k, *a)
                                                        for _, k, a in batch]))

    @_wrap_errors
    def verify_batch(self, calls: "Sequence[SettlementCall] | PreparedBatch") -> list[SettlementResult | SettlementConflict]:
        """Many settlements in one pipelined round trip, executed in order (bulk jobs). A
        settlement's own failure (a reused id with another body) comes back in its place.
        `calls` may come already prepared (prepare_batch)."""
        prepared = calls if isinstance(calls, PreparedBatch) else self.prepare_batch(calls)
        if self.cluster:
            return self._verify_sharded(prepared.calls)
        replies = self._run(prepared.batch or [], wire=prepared.wire)
        return [_conflict_or(res, lambda r, c=c: _decode(r, c)) for res, c in zip(replies, prepared.calls)]

    def _verify_sharded(self, calls: Sequence[SettlementCall]) -> list:
        """Cluster: claim each settlement id (its digest on the settlement's own key), then judge
        every part in its slot, pipelined. An ALL_OR_NOTHING settlement over several slots is a
        two-phase commit with the settlement's own record as its log:

        1. prepare: each part is judged and, when all its lines are OK, its units reserved
           (verify.lua mode 'P'; a part left prepared by a dead coordinator is judged afresh);
        2. decide: commit ('K') when every part was prepared, within half the reservation's
           life, else abort ('X'); the decision is recorded once (decide.lua, first one wins);
        3. apply the recorded decision to every part (commit.lua), which never takes units that
           another settlement holds or took (an expired reservation: docs/scaling.md).

        A retry that finds a decision recorded applies it without judging again; one that finds
        none prepares again. `replayed` is true only when nothing was written by this call."""
        out: list = [None] * len(calls)
        plans = [self._parts(c) for c in calls]
        decided: dict[int, str] = {}
        claims = []
        for n, c in enumerate(calls):
            if c.dispense:
                sk = c.state or self.keys
                skey = sk.settlement(c.site, c.settlement_id)
                args = [c.digest, json.dumps([p[0] for p in plans[n]]), c.site, c.settlement_id,
                        c.settled_at_ms, c.state_ttl_s or self.limits.settlement_ttl_s]
                ckeys = [skey, sk.registry_for(skey)] if c.state else [skey]
                claims.append((n, (self._claim, ckeys, args)))
        if claims:
            for (n, _), res in zip(claims, self._run([call for _, call in claims])):
                if isinstance(res, Exception):
                    raise res
                mine, decision = res
                if not mine:
                    out[n] = SettlementConflict("settlement id already used with a different request body")
                elif decision:
                    decided[n] = decision
        started = time.monotonic()
        # Phase 1: every part of every undecided settlement, pipelined.
        batch, where = [], []
        for n, (c, parts) in enumerate(zip(calls, plans)):
            if out[n] is not None or n in decided:
                continue
            two_phase = c.dispense and c.all_or_nothing and len(parts) > 1
            mode = "P" if two_phase else ("D" if c.dispense else "C")
            for record, lines, idx, codes in parts:
                keys, args = self._verify_keys_args(c, mode, record, lines, idx, codes)
                batch.append((self._verify, keys, args))
                where.append((n, record, idx, codes))
        results: dict[int, list[list]] = {}
        durable = any(c.dispense and not c.state for c in calls)
        for (n, record, idx, codes), res in zip(where, self._run(batch, durable=durable) if batch else []):
            if isinstance(res, Exception):
                out[n] = _conflict_or(res, None)
                continue
            c = calls[n]
            own = (c.site, c.settlement_id, c.settled_at_ms)
            results.setdefault(n, []).append([record, idx, codes, bool(res[0]), _stored_results(res[1], *own), res[2]])
        failpoint("after_prepare")
        # Phase 2: record a decision for every settlement with prepared parts.
        in_time = (time.monotonic() - started) * 1000 < self.limits.reservation_ms / 2
        undecided = [n for n, parts in results.items()
                     if out[n] is None and any(p[5] == "P" for p in parts)]
        if undecided:
            asks = []
            for n in undecided:
                ok = in_time and all(p[5] == "P" for p in results[n])
                sk = calls[n].state or self.keys
                asks.append((self._decide, [sk.settlement(calls[n].site, calls[n].settlement_id)],
                             ["K" if ok else "X"]))
            for n, res in zip(undecided, self._run(asks, durable=durable)):
                if isinstance(res, Exception):
                    raise res
                decided[n] = res
        failpoint("after_decide")
        for n in decided:
            if n not in results:  # decided by an earlier attempt: every part gets the decision
                results[n] = [[record, idx, codes, True, None, "P"] for record, _, idx, codes in plans[n]]
        # Phase 3: apply each recorded decision to every prepared part.
        commits = []
        for n, decision in decided.items():
            if out[n] is not None:
                continue
            for p in results[n]:
                if p[5] == "P":
                    commits.append((n, p, decision))
        if commits:
            batch = []
            for n, (record, _, codes, *_), decision in commits:
                sk = calls[n].state or self.keys
                keys = [record, sk.audit_for(record)]
                for code in codes:  # the live issuance (its pack units), the namespace's state
                    keys += self.keys.code_keys(code, calls[n].state)
                batch.append((self._commit, keys, [decision, self.limits.history_max, self.limits.audit_max, *codes]))
            for (n, p, _), res in zip(commits, self._run(batch, durable=durable)):
                if isinstance(res, Exception):
                    raise res
                c = calls[n]
                p[4], p[5] = _stored_results(res[0], c.site, c.settlement_id, c.settled_at_ms), res[1]
                if int(res[2]):
                    p[3] = False  # this call wrote it: not a replay
                if res[1] == "E":
                    log.warning("settlement %s of site %s: a part could not be committed after its "
                                "reservation expired (packs taken meanwhile); reported as not recorded",
                                calls[n].settlement_id, calls[n].site)
        # Merge the parts back into request order.
        for n, judged in results.items():
            if out[n] is not None:
                continue
            merged: list = [None] * len(calls[n].lines)
            for _, idx, _, _, (_, rows), _ in judged:
                for i, row in zip(idx, rows):
                    merged[i] = row
            out[n] = SettlementResult(all(p[3] for p in judged), any(p[4][0] for p in judged), merged)
        return out

    @_wrap_errors
    def drop_namespace(self, keys: KeySpace) -> int:
        """Delete what a bulk job's namespace holds; returns how many keys. Every script call in a
        job namespace registers the keys it writes in a set per bucket (keys.registries), so this
        unlinks those members, not a SCAN over the whole keyspace (10^9 issued codes nationally).
        Keys of a namespace left without its registry (an interrupted drop) expire with the job."""
        if keys.prefix == self.keys.prefix:
            raise ValueError("refusing to drop the live namespace")
        deleted = 0
        for registry in keys.registries():
            batch: list[str] = []
            for key in self.r.sscan_iter(registry, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += self._unlink(batch)
                    batch = []
            if batch:
                deleted += self._unlink(batch)
            # The registry last: a drop interrupted before it can be run again.
            self.r.unlink(registry)
        return deleted

    def _unlink(self, keys: list[str]) -> int:
        if not self.cluster:
            return self.r.unlink(*keys)
        pipe = self.r.pipeline(transaction=False)
        for k in keys:
            pipe.unlink(k)
        return sum(pipe.execute())

    def _part_records(self, site: str, settlement_id: str) -> tuple[str | None, list[str]]:
        """(digest, part record keys) of a recorded settlement; (None, []) when unknown."""
        skey = self.keys.settlement(site, settlement_id)
        d, parts = self.r.hmget(skey, "d", "parts")
        if d is None:
            return None, []
        return d, json.loads(parts) if parts else [skey]

    @_wrap_errors
    def stored_settlement(self, site: str, settlement_id: str) -> tuple[str, SettlementResult] | None:
        """(digest, stored answer as a replay) of a recorded settlement, or None."""
        digest, records = self._part_records(site, settlement_id)
        if digest is None:
            return None
        if records == [self.keys.settlement(site, settlement_id)]:
            r, at = self.r.hmget(records[0], "r", "at")
            return (digest, SettlementResult(True, *_stored_results(r, site, settlement_id, int(at or 0)))) if r else None
        pipe = self.r.pipeline(transaction=False)
        for rk in records:
            pipe.hmget(rk, "r", "l", "ps", "at")
        rows: dict[int, ScriptRow] = {}
        rec = 0
        for r, ledger, ps, at in pipe.execute():
            if r is None or ps != "F":
                return None  # an interrupted settlement: only a retry can finish it
            recorded, part_rows = _stored_results(r, site, settlement_id, int(at or 0))
            rec |= recorded
            for entry, row in zip(json.loads(ledger), part_rows):
                rows[entry[3]] = row
        return digest, SettlementResult(True, bool(rec), [rows[i] for i in sorted(rows)])

    @_wrap_errors
    def reverse(self, *, site: str, settlement_id: str, now_ms: int, window_ms: int,
                line_indexes: Sequence[int], note: str) -> list[tuple[int, str, int, int, bool]]:
        """Return lines of a settlement. Two round trips: read the ledgers for the code keys, then
        one atomic script per part (one part on a single node) that re-checks everything against
        the ledger it reads itself."""
        _, records = self._part_records(site, settlement_id)
        if not records:
            raise SettlementNotFound("settlement not found")
        pipe = self.r.pipeline(transaction=False)
        for rk in records:
            pipe.hget(rk, "l")
        ledgers = [json.loads(raw) if raw else [] for raw in pipe.execute()]
        owner = {entry[3]: n for n, ledger in enumerate(ledgers) for entry in ledger}
        for i in line_indexes:
            if i not in owner:
                raise BadLineIndex(i)
        batch = []
        lim = self.limits
        for n, (rk, ledger) in enumerate(zip(records, ledgers)):
            wanted = [i for i in line_indexes if owner[i] == n]
            if line_indexes and not wanted:
                continue
            codes = sorted({e[0] for e in ledger if e[0]})
            keys = [rk, self.keys.audit_for(rk)]
            for code in codes:
                keys += self.keys.code_keys(code)[-2:]  # its state and history (both layouts)
            args = [site, now_ms, window_ms, lim.history_max, lim.audit_max, note, len(codes), *codes, *wanted]
            batch.append((self._reverse, keys, args))
        lines = []
        for res in self._run(batch, durable=True):
            if isinstance(res, Exception):
                raise res
            lines += [(i, code, returned, used, bool(already)) for i, code, returned, used, already in json.loads(res)]
        return sorted(lines)

    # ------------------------------------------------------------------ issuance

    @_wrap_errors
    def upsert_issuance(self, records: Sequence[tuple], *, replace: bool) -> list[int]:
        """records: (code, product, gtin, batch, expiry YYYYMMDD|0, pack_units, manufacturer, status|'').
        Returns per record 0 unchanged, 1 created, 2 updated, 3 conflict, 4 fewer pack units than
        already dispensed (lua/issue.lua). One script call per
        chunk; the batch index (for recalls) is written in the same round trip."""
        if not records:
            return []
        batch = []
        groups = self._by_slot([r[0] for r in records])
        for positions in groups:
            keys: list[str] = []
            args: list = ["1" if replace else "0"]
            for p in positions:
                code, product, gtin, batch_id, expiry, units, mfr, status = records[p]
                keys += self.keys.code_keys(code)[:2]  # layout 2: bucket, lots; layout 1: issuance, dispense
                if self.layout == 2:
                    keys.append(self.keys.batch_part(product, batch_id, code))
                    args.append(code)
                args += [product, gtin, batch_id, expiry, units, mfr, status]
            batch.append((self._issue, keys, args))
        out = [0] * len(records)
        for positions, res in zip(groups, self._run(batch)):
            if isinstance(res, Exception):
                raise res
            for p, outcome in zip(positions, res):
                out[p] = int(outcome)
        if self.layout == 1:  # layout 2 writes its batch index in the script, atomically
            pipe = self.r.pipeline(transaction=False)
            for code, product, _, batch_id, *_ in records:
                if batch_id:
                    pipe.sadd(self.keys.batch(product, batch_id), code)
            pipe.execute()
        return out

    def _by_slot(self, codes: Sequence[str]) -> list[list[int]]:
        """Positions of codes grouped so each group is one script call: all of them on one node,
        one group per hash slot on a cluster."""
        if not self.cluster:
            return [list(range(len(codes)))]
        groups: dict[int, list[int]] = {}
        for p, code in enumerate(codes):
            groups.setdefault(slot_of(code), []).append(p)
        return list(groups.values())

    def _read(self, code: str, history: bool) -> tuple[list[str], list[str], list[str]]:
        """Layout 2: (entry fields, lot fields, raw kept events) of a code, one consistent read."""
        bkey, lkey, _, hkey = self.keys.code_keys(code)
        entry, lot, events = self._call(self._scripts["read"], [bkey, lkey, hkey], [code, "1" if history else "0"])
        return (entry.split(US) if entry else []), (lot.split(US) if lot else []), events

    @_wrap_errors
    def get_issuance(self, code: str) -> IssuanceRecord | None:
        if self.layout == 2:
            entry, lot, _ = self._read(code, False)
            return _lot_record(entry, lot)
        values = self.r.hmget(self.keys.issuance(code), *(f for f, _ in _ISSUANCE_FIELDS))
        return _issuance(values)

    @_wrap_errors
    def set_status(self, codes: Sequence[str], status: str, *, now_ms: int, reason: str,
                   actor: str, only: tuple[str, str] | None = None) -> list[str]:
        """Set the status of codes (one atomic call per chunk); returns each previous status,
        '' for a code that was never issued (left untouched). `only` = (product, batch): codes
        whose stored record is of another product or batch are left untouched too ('')."""
        if not codes:
            return []
        lim = self.limits
        product, batch = only or ("", "")
        groups = self._by_slot(codes)
        calls = []
        for positions in groups:
            group = [codes[p] for p in positions]
            keys = [self.keys.audit_for(self.keys.issuance(group[0]))]
            for code in group:
                k = self.keys.code_keys(code)
                keys.extend(k if self.layout == 1 else (k[0], k[1], k[3]))  # layout 2: bucket, lots, history
            calls.append((self._status, keys, [status, now_ms, reason, actor, lim.history_max, lim.audit_max,
                                               product, batch, *group]))
        out = [""] * len(codes)
        for positions, res in zip(groups, self._run(calls, durable=True)):
            if isinstance(res, Exception):
                raise res
            for p, prev in zip(positions, res):
                out[p] = prev
        return out

    def batch_codes(self, product: str, batch: str, chunk: int = 500) -> Iterator[list[str]]:
        """The codes of a batch in chunks: layout 2 reads the batch's index in every tag (pipelined,
        64 tags a round trip); layout 1 scans its one set with SSCAN (the cursor is a page each)."""
        if self.layout == 2:
            yield from self._batch_parts(product, batch, chunk)
            return
        key = self.keys.batch(product, batch)
        cursor = 0
        buf: list[str] = []
        while True:
            cursor, codes = self._sscan(key, cursor, chunk)
            buf.extend(codes)
            if len(buf) >= chunk or (cursor == 0 and buf):
                yield sorted(buf)
                buf = []
            if cursor == 0:
                return

    def _batch_parts(self, product: str, batch: str, chunk: int) -> Iterator[list[str]]:
        parts = self.keys.batch_parts(product, batch)
        buf: list[str] = []
        for start in range(0, len(parts), 64):
            for codes in self._hkeys(parts[start:start + 64]):
                buf.extend(codes)
            while len(buf) >= chunk:
                yield sorted(buf[:chunk])
                buf = buf[chunk:]
        if buf:
            yield sorted(buf)

    @_wrap_errors
    def _hkeys(self, keys: list[str]) -> list[list[str]]:
        pipe = self.r.pipeline(transaction=False)
        for key in keys:
            pipe.hkeys(key)
        return pipe.execute()

    @_wrap_errors
    def _sscan(self, key: str, cursor: int, count: int) -> tuple[int, list[str]]:
        # One page per call, so a Redis failure mid-scan is translated like any other call's.
        return self.r.sscan(key, cursor, count=count)

    def first_insured(self, codes: Sequence[str], state: KeySpace | None = None) -> dict[str, str]:
        """code -> the pseudonym of its first dispense's buyer (codes without one left out); with
        `state`, as a bulk job's namespace has it. One pipelined round trip."""
        if not codes:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for code in codes:
            keys = self.keys.code_keys(code, state)
            if self.layout == 1:
                pipe.hget(keys[1], "fp")
            else:
                pipe.hget(keys[2], code)
        out = {}
        for code, raw in zip(codes, pipe.execute()):
            fp = raw if self.layout == 1 else (_field(raw.split(US), "fp") if raw else "")
            if fp:
                out[code] = fp
        return out

    @_wrap_errors
    def code_history(self, code: str) -> CodeHistory:
        """A code's issuance record, dispense state and kept events (oldest first), one round trip."""
        if self.layout == 2:
            return _history2(*self._read(code, True))
        ikey, dkey, hkey = self.keys.code_keys(code)
        pipe = self.r.pipeline(transaction=not self.cluster)
        pipe.hmget(ikey, *(f for f, _ in _ISSUANCE_FIELDS))
        pipe.hgetall(dkey)
        pipe.lrange(hkey, 0, -1)
        values, state, events = pipe.execute()
        history = CodeHistory(_issuance(values), units_used=int(state.get("u", 0)),
                              events_total=int(state.get("ev", 0)))
        if state.get("fs"):
            history.first_site_id, history.first_settlement_id = state["fs"], state.get("fi", "")
            history.first_settled_at_ms, history.attempts = int(state.get("fa", 0)), int(state.get("at", 0))
            history.first_insured_id = state.get("fp", "")
        history.events = [_event(raw) for raw in events]
        return history


def _event(raw: str) -> CodeEvent:
    e = json.loads(raw)
    return CodeEvent(e["t"], int(e["a"]), e["s"], e["i"], int(e["l"]), int(e["u"]), str(e["x"]), e.get("p", ""))


def _field(entry: list[str], name: str) -> str:
    i = _E[name]
    return entry[i] if i < len(entry) else ""


def _lot_record(entry: list[str], lot: list[str]) -> IssuanceRecord | None:
    """Layout 2: a code's entry and its lot's fields -> the issuance record, None if not issued."""
    if not lot:
        return None
    return IssuanceRecord(lot[_LOT["product_id"]], lot[_LOT["gtin"]], lot[_LOT["batch"]], int(lot[_LOT["expiry"]] or 0),
                          int(lot[_LOT["pack_units"]] or 1), lot[_LOT["manufacturer"]], _field(entry, "status") or "ACTIVE")


def _history2(entry: list[str], lot: list[str], events: list[str]) -> CodeHistory:
    """Layout 2: the history of a code from its entry, lot and list. The first-ever DISPENSED
    event, while implicit (lua/_state.lua), is rebuilt from the entry at its place."""
    f = lambda name: _field(entry, name)
    history = CodeHistory(_lot_record(entry, lot), units_used=int(f("u") or 0), events_total=int(f("ev") or 0))
    if f("fs"):
        history.first_site_id, history.first_settlement_id = f("fs"), f("fi")
        history.first_settled_at_ms, history.attempts = int(f("fa") or 0), int(f("at") or 0)
        history.first_insured_id = f("fp")
    history.events = [_event(raw) for raw in events]
    if f("fd") and f("fx") != "1":
        history.events.insert(int(f("fd")), CodeEvent("DISPENSED", int(f("fa") or 0), f("fs"), f("fi"), int(f("fl") or 0),
                                                      int(f("fu") or 0), "", f("fp")))
    return history


def _issuance(values: list) -> IssuanceRecord | None:
    """An issuance hash's fields (HMGET in _ISSUANCE_FIELDS order) -> the record, None if absent."""
    if values[0] is None:
        return None
    product, gtin, batch, expiry, units, mfr, status = values
    return IssuanceRecord(product, gtin or "", batch or "", int(expiry or 0), int(units or 1), mfr or "",
                          status or "ACTIVE")


def _conflict_or(res, convert):
    """A script's answer in a pipeline: its SettlementConflict as a value (one settlement of a
    batch failing alone), other errors raised."""
    if isinstance(res, redis.ResponseError):
        domain = from_script_error(str(res))
        if isinstance(domain, SettlementConflict):
            return domain
        raise domain if domain is not None else res
    if isinstance(res, Exception):
        raise res
    return convert(res) if convert else res


def now_ms() -> int:
    return time.time_ns() // 1_000_000
