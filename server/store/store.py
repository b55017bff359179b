"""The Store: every Redis operation of the service.

Every operation a verdict depends on is one Lua script call (loaded once, called by SHA), so the
check and the mark of a code are atomic and a settlement costs one round trip, whatever its size.
The scripts live in server/store/lua/; the key layout in keys.py.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterator, Sequence

import hiredis
import redis

from tracecode.codec import wire

from ..errors import (BadLineIndex, DataSetMismatch, PackPruned, SettlementConflict, SettlementNotFound, StoreUnavailable,
                     from_script_error)
from .embedded import LISTPACK_CONFIG
from .keys import KeySpace, slot_of
from .marker import DataSetMarker
from .layout import ENTRY_FIELDS, LOT_FIELDS, RS, US, VERIFY_ARGV, lua_layout, lua_row_text
from tracecode.rules.schema import RECEIVE_ARGV
from .twophase import TwoPhase, conflict_or
from .types import (CodeEvent, CodeHistory, IssuanceRecord, ReceiveCall, ReceiveResult, ReceiveRow, Reversal, ScriptRow,
                    SettlementCall, StoredSettlement, SettlementResult, decode_stored)
from redis.crc import key_slot
from tracecode.rules.live import person_tag
from tracecode.rules.packing import code_field, code_of, hex128_field, hex128_of, id_field, id_of, ms_of
from tracecode.rules.verdicts import lua_precedence

log = logging.getLogger("tracecode.store")

# observer(operation name, seconds, failed): how the store's operations are measured.
StoreObserver = Callable[[str, float, bool], None]


def script_text(name: str) -> str:
    """A script's text with its shared parts spliced in."""
    lua = resources.files("tracecode.server.store").joinpath("lua")
    text = lua.joinpath(name).read_text()
    if name == "verify.lua":  # judged inside the sanction gate, in the same call (lua/gate.lua)
        text = lua.joinpath("gate.lua").read_text().replace("--@VERIFY@--", text)
    text = text.replace("--@STATE@--", lua.joinpath("_state.lua").read_text().replace("--@ROWTEXT@--", lua_row_text()))
    # The audit writer (lua/_audit.lua): where the script marks it, before its first audit entry.
    text = text.replace("--@AUDIT@--", lua.joinpath("_audit.lua").read_text())
    # The live rules (lua/_live.lua): in gate.lua (one node) and live.lua (a cluster's second call).
    text = text.replace("--@LIVE@--", lua.joinpath("_live.lua").read_text())
    text = text.replace("--@LAYOUT@--", lua_layout())
    return text.replace("--@PRECEDENCE@--", lua_precedence())


@dataclass(frozen=True)
class StoreLimits:
    audit_max: int = 1_000_000  # per audit stream (there are keys.BUCKETS of them); approximate trim
    # With an archiver (tracecode archive): the hard bound per stream, entries; the archiver trims
    # at its watermark and only this bound drops unarchived entries (lua/_audit.lua). 0: no archive.
    audit_bound: int = 0

    @property
    def audit_arg(self) -> int:
        """The scripts' audit_max argument: > 0 MAXLEN ~ audit_max; < 0 archived, bound -arg."""
        return -self.audit_bound if self.audit_bound else self.audit_max
    history_max: int = 256  # events kept per code; the total is counted past it
    settlement_ttl_s: int = 40 * 86400  # idempotency record and return ledger lifetime (config.py)
    reservation_ms: int = 30_000  # cluster ALL_OR_NOTHING: how long prepared units stay reserved
    # Durability across failover: a write is acknowledged only once this many replicas have it
    # (WAIT after the write; 0 = asynchronous replication, Redis's default).
    min_replicas_acked: int = 0
    replica_ack_timeout_ms: int = 500


# The entry's and the lot's field positions (layout.py), 0-based.
_E = {f: i for i, f in enumerate(ENTRY_FIELDS)}
_LOT = {f: i for i, f in enumerate(LOT_FIELDS)}
_ID_FIELDS = (_E["fs"], _E["fi"], _E["rs"])  # packed ids (rules/packing.py id_field)


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
    into StoreUnavailable, a script's own TC... error into its domain error (errors.py registry).
    A store method so wrapped is also reported to the store's observer, when it has one (the
    metrics: app.make_store), by name, with its duration and whether it failed: Redis unreachable
    or an error reply, not a domain answer such as a conflict."""
    name = fn.__name__

    def call(*args, **kwargs):
        observer = getattr(args[0], "observer", None) if args else None
        start = time.perf_counter() if observer else 0.0
        failed = False
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            if _unavailable(exc):
                failed = True
                raise StoreUnavailable(f"redis unavailable: {exc}") from exc
            domain = from_script_error(str(exc)) if isinstance(exc, redis.ResponseError) else None
            if domain is None:
                failed = True
                raise
            raise domain from None
        except StoreUnavailable:
            failed = True
            raise
        finally:
            if observer:
                observer(name, time.perf_counter() - start, failed)
    call.__name__ = name
    call.__doc__ = fn.__doc__
    return call


# The store's other modules (store/sanctions.py) translate their errors the same way.
wrap_errors = _wrap_errors


def _pack(commands: Sequence[tuple]) -> bytes:
    """The RESP bytes of a pipeline of commands (hiredis.pack_command, in C)."""
    return b"".join([hiredis.pack_command(c) for c in commands])


def _decode(reply: list, call: SettlementCall) -> SettlementResult:
    """A verify.lua answer {replayed, results, part state[, sanctions json]} to `call`, decoded
    once, here. The 4th element: the sanction entries gate.lua found binding a check (json)."""
    recorded, rows = decode_stored(reply[1], call.site, call.settlement_id, call.settled_at_ms)
    sx = json.loads(reply[3]) if len(reply) > 3 and reply[3] else []
    # The 5th: the live rules' answer (lua/gate.lua), when they ran.
    live = json.loads(reply[4]) if len(reply) > 4 else ({} if call.live and not reply[0] else None)
    return SettlementResult(bool(reply[0]), recorded, rows, sx, live)


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
                 cluster: bool = False, observer: StoreObserver | None = None):
        self.r = client
        self.cluster = cluster
        # Told of each operation's duration and failure (metrics.observe_store); None: nobody.
        self.observer = observer
        self.keys = keys or KeySpace()
        self.limits = limits or StoreLimits()
        names = ["verify", "reverse", "issue", "status", "commit", "claim", "decide", "sanction", "read", "prune",
                 "archive_commit", "live", "receive", "batch"]
        self.scripts = {name: client.register_script(script_text(f"{name}.lua")) for name in names}
        self._verify = self.scripts["verify"]
        self._reverse = self.scripts["reverse"]
        self._issue = self.scripts["issue"]
        self._status = self.scripts["status"]
        self._commit = self.scripts["commit"]
        self._claim = self.scripts["claim"]
        self._decide = self.scripts["decide"]
        # The data-set marker this store must find before its first script call (marker.py);
        # None when nobody asked (a store driven directly, by tests or benchmarks).
        self.dataset: DataSetMarker | None = None
        self._dataset_create = False
        self._dataset_open = True

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
        """What in the Redis server's configuration costs memory (never correctness): hashes
        above the listpack limits are kept as hashtables, ~70 bytes more per code."""
        want = dict(zip(LISTPACK_CONFIG[0::2], LISTPACK_CONFIG[1::2]))
        try:
            node = self.r.get_redis_connection(self.r.get_primaries()[0]) if self.cluster else self.r
            got = node.config_get("hash-max-listpack-*")
        except redis.RedisError as exc:  # CONFIG is often disabled on managed Redis
            return [f"cannot read the Redis configuration ({exc}); tracecode wants {LISTPACK_CONFIG}"]
        low = [f"{k.lstrip('-')} is {got.get(k.lstrip('-'))} (want >= {v})" for k, v in want.items()
               if int(got.get(k.lstrip("-"), 0) or 0) < int(v)]
        return [f"Redis {', '.join(low)}: codes will take more memory (docs/scaling.md)"] if low else []

    # ------------------------------------------------------------------ the data-set marker

    def expect_dataset(self, expected: DataSetMarker, *, create: bool) -> None:
        """Hold the data set to `expected` from the next script call on: that call compares the
        marker first (open_dataset) and runs only if it matches."""
        self.dataset, self._dataset_create, self._dataset_open = expected, create, False

    @_wrap_errors
    def open_dataset(self, expected: DataSetMarker, *, create: bool) -> None:
        """Hold the data set to `expected` (marker.py): write the marker when there is none and
        `create` (a server's first start), then compare. DataSetMismatch names what differs;
        StoreUnavailable when Redis cannot be reached, and then the first script call checks
        before it runs (no script runs on an unchecked data set)."""
        self.expect_dataset(expected, create=create)
        key, where = self.keys.marker(), f"under key prefix {self.keys.prefix!r}"
        if create:
            self.r.set(key, expected.encode(), nx=True)  # the first of two racing servers wins
        raw = self.r.get(key)
        if raw is None:
            raise DataSetMismatch(f"no data-set marker {where}: no tracecode server has started on this data set "
                                  "(a server writes it at its first start)")
        expected.check(DataSetMarker.decode(raw, where), where)
        self._dataset_open = True

    def recheck_dataset(self) -> None:
        """Compare the marker again (a bulk job, a pruning run: the data set may have been
        re-created under the server since it started)."""
        if self.dataset is not None:
            self.open_dataset(self.dataset, create=False)

    # ------------------------------------------------------------------ script calls

    def _load_scripts(self) -> None:
        """(Re)load every script; on a cluster on every master. Redis 7 keeps no script cache
        across restarts or failovers, so a NOSCRIPT answer leads here once."""
        clients = ([self.r.get_redis_connection(n) for n in self.r.get_primaries()] if self.cluster
                   else [self.r])
        for client in clients:
            for script in self.scripts.values():
                client.script_load(script.script)

    def call_script(self, script, keys: Sequence[str], args: Sequence, *, durable: bool = False) -> Any:
        """One script call, one round trip."""
        res = self.run_scripts([(script, keys, args)], durable=durable)[0]
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

    def run_scripts(self, calls: Sequence[tuple], *, durable: bool = False, wire: bytes | None = None) -> list:
        """Many script calls (script, keys, args) pipelined: one round trip (one per master on a
        cluster), executed in order per node. A script's own error comes back in its place.
        Every script is idempotent, so calls may be sent again after a NOSCRIPT or a MOVED
        (a failover or resharding): the topology is refreshed and the batch retried once.

        durable: with min_replicas_acked, each node's pipeline ends with WAIT on the same
        connection (WAIT counts the replicas that have this connection's writes); fewer replicas
        than asked is UNAVAILABLE and the caller retries with the same id. This is what makes an
        acknowledged dispense survive the loss of its master."""
        if not self._dataset_open:  # Redis was down when the marker was to be checked
            self.open_dataset(self.dataset, create=self._dataset_create)
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

    def parts_of(self, call: SettlementCall) -> list[tuple[str, list, list[int], list[str]]]:
        """Split a settlement into parts that one script call can judge atomically:
        [(record key, lines, line indexes, codes)]. On one node a single part, recorded under
        the settlement's key. On a cluster one part per hash slot, recorded in that slot;
        malformed lines (which touch no key) ride with the first part."""
        sk = call.state or self.keys
        site, sid, lines, codes = call.site, call.settlement_id, call.lines, call.codes
        if not self.cluster:
            return [(sk.settlement(site, sid), list(lines), list(range(len(lines))), list(codes))]
        return [(sk.settlement_part(site, sid, first or f"{site}:{sid}"), part_lines, idx, part_codes)
                for first, part_lines, idx, part_codes in _by_slot(lines, codes)]

    def verify_keys_args(self, call: SettlementCall, mode: str, record: str, lines, idx, codes) -> tuple[list, list]:
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
                 "settled_at_ms": call.settled_at_ms, "settle_day": call.settle_day,
                 "digest": hex128_field(call.digest),
                 "policy": "A" if call.all_or_nothing else "R", "audit_max": 0 if state else lim.audit_arg,
                 "history_max": lim.history_max, "settlement_ttl_s": call.state_ttl_s or lim.settlement_ttl_s,
                 "n_lines": len(lines), "state_ttl": state_ttl, "buyer": hex128_field(call.insured),
                 "site_packed": id_field(call.site), "settlement_packed": id_field(call.settlement_id)}
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
        # The live rules ride on live dispenses only (never a bulk job's namespace).
        live = call.live if mode in ("D", "P") and not state else ""
        args = wire.verify_argv([fixed[f] for f in VERIFY_ARGV], lines, idx, [*codes, *map(code_field, codes)],
                                (call.insured, gate, len(gate_keys), live))
        return keys, args

    def verify_call(self, call: SettlementCall) -> tuple[list, list]:
        """KEYS and ARGV of a single-part settlement (one node); the benchmarks use it too."""
        ((record, lines, idx, codes),) = self.parts_of(call)
        return self.verify_keys_args(call, "D" if call.dispense else "C", record, lines, idx, codes)

    @_wrap_errors
    def verify(self, call: SettlementCall) -> SettlementResult:
        """Judge (and when `call.dispense`, mark) one settlement: one round trip on one node (one
        per slot touched on a cluster), decoded into one ScriptRow per line."""
        if self.cluster:
            out = TwoPhase(self).run([call])[0]
            if isinstance(out, Exception):
                raise out
            return out
        keys, args = self.verify_call(call)
        return _decode(self.call_script(self._verify, keys, args, durable=call.dispense and not call.state), call)

    # ------------------------------------------------------------------ receiving (入库核验)

    def _receive_parts(self, call: ReceiveCall) -> list[tuple[str, list, list[int], list[str]]]:
        """[(record key, lines, line indexes, codes)]: one part on a single node (any key may be
        touched there), one per hash slot on a cluster (malformed lines with the first)."""
        site, did, lines, codes = call.site, call.delivery_id, call.lines, call.codes
        if not self.cluster:
            return [(self.keys.delivery(site, did), list(lines), list(range(len(lines))), list(codes))]
        return [(self.keys.delivery_part(site, did, first or f"{site}:{did}"), part_lines, idx, part_codes)
                for first, part_lines, idx, part_codes in _by_slot(lines, codes)]

    def _receive_args(self, call: ReceiveCall, record: str, lines, idx, codes) -> tuple[list, list]:
        keys = [record, self.keys.audit_for(record)]
        for code in codes:
            bucket, lots, _, _ = self.keys.code_keys(code)
            keys += [bucket, lots]
        fixed = {"site": call.site, "delivery_id": call.delivery_id, "supplier": call.supplier,
                 "received_at_ms": call.received_at_ms, "receive_day": call.receive_day, "digest": call.digest,
                 "audit_max": self.limits.audit_arg, "record_ttl_s": self.limits.settlement_ttl_s,
                 "n_lines": len(lines)}
        args: list = [fixed[f] for f in RECEIVE_ARGV]
        for (u, product, reason), i in zip(lines, idx):
            args += [u, product, reason, i]
        return keys, args + list(codes)

    @_wrap_errors
    def receive(self, call: ReceiveCall) -> ReceiveResult:
        """The receiving check of one delivery: one atomic call on one node (one round trip); on a
        cluster a claim of the delivery id for this body, then one atomic call per slot, pipelined
        (one round trip per master). Every part is idempotent on the delivery's digest, so a
        retry after any failure answers what was recorded and finishes what was not."""
        parts = self._receive_parts(call)
        if self.cluster:
            # The claim: receive.lua over no lines, on the delivery's own record. A different body
            # under the same id is refused here, before any part is written.
            keys, args = self._receive_args(call, self.keys.delivery(call.site, call.delivery_id), [], [], [])
            conflict_or(self.call_script(self.scripts["receive"], keys, args, durable=True), None)
        calls = [(self.scripts["receive"], *self._receive_args(call, rk, lines, idx, codes))
                 for rk, lines, idx, codes in parts]
        outs = [conflict_or(reply, None) for reply in self.run_scripts(calls, durable=True)]
        for out in outs:
            if isinstance(out, SettlementConflict):
                raise out
        rows: list[ReceiveRow | None] = [None] * len(call.lines)
        replayed = True
        for (_, _, idx, _), (replayed_part, text) in zip(parts, outs):
            replayed &= bool(replayed_part)
            for i, row in zip(idx, _receive_rows(text)):
                rows[i] = row
        return ReceiveResult(replayed, [r for r in rows if r is not None])

    def live_keys(self, person: str, products: Sequence[str] = ()) -> list[str]:
        """live.lua's KEYS for one person: the audit stream of their hash tag, their RESALE_SOURCE
        state, then per product their STOCKPILING codes and sites (lua/_live.lua names them so)."""
        tag, p = person_tag(person), self.keys.prefix
        keys = [f"{p}:{tag}:audit", f"{p}:{tag}:vr:{person}"]
        for product in products:
            keys += [f"{p}:{tag}:vc:{person}:{product}", f"{p}:{tag}:vt:{person}:{product}"]
        return keys

    @_wrap_errors
    def live_rules(self, cfg: str, op: str, person: str, call: SettlementCall, packs: Sequence[tuple[str, str]],
                   credits: Sequence[tuple[str, str]]) -> list[dict]:
        """The live rules in the persons' own slots (a cluster's one further round trip, pipelined
        per node): op 'J' judges and records `person` with the settlement's recorded OK `packs`
        ((product, code)) and credits the first buyers of its DUPLICATEs ((pseudonym, code));
        'D' judges only, before the settlement (a refusal raises LiveRuleRefused). Returns the
        person's notices."""
        lim = self.limits
        mine = [code for fp, code in credits if fp == person] if op == "J" else []

        def args(o: str, who: str, ps, cs) -> list:
            # The state's members are the packs' codes packed (rules/packing.py), as on one node.
            return [cfg, o, who, call.site, call.settlement_id, call.settled_at_ms, lim.audit_arg, len(ps),
                    *[x for product, code in ps for x in (product, code_field(code))], len(cs),
                    *map(code_field, cs)]
        calls = []
        if person:
            products = list(dict.fromkeys(product for product, _ in packs))  # first appearance order
            calls.append((self.scripts["live"], self.live_keys(person, products), args(op, person, packs, mine)))
        if op == "J":
            others: dict[str, list[str]] = {}
            for fp, code in credits:
                if fp != person:
                    others.setdefault(fp, []).append(code)
            for fp, codes in others.items():
                calls.append((self.scripts["live"], self.live_keys(fp), args("W", fp, [], codes)))
        if not calls:
            return []
        replies = self.run_scripts(calls, durable=op == "J")
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return json.loads(replies[0]) if person and replies[0] != "[]" else []

    def prepare_batch(self, calls: Sequence[SettlementCall]) -> "PreparedBatch":
        """The CPU half of verify_batch: every call's KEYS, ARGV and (on one node) the pipeline's
        wire bytes. A bulk job does this for chunk N+1 while Redis runs chunk N, so Redis does
        not wait for Python between chunks."""
        if self.cluster:  # routed and split per slot at run time (the topology may change)
            return PreparedBatch(list(calls), None, None)
        batch = []
        for call in calls:
            keys, args = self.verify_call(call)
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
            return TwoPhase(self).run(prepared.calls)
        replies = self.run_scripts(prepared.batch or [], wire=prepared.wire)
        return [conflict_or(res, lambda r, c=c: _decode(r, c)) for res, c in zip(replies, prepared.calls)]

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
        # A record's own digest is packed (rules/packing.py); a cluster's claim keeps it plain.
        return hex128_of(d), json.loads(parts) if parts else [skey]

    @_wrap_errors
    def stored_settlement(self, site: str, settlement_id: str) -> StoredSettlement | None:
        """(digest, stored answer as a replay) of a recorded settlement, or None."""
        digest, records = self._part_records(site, settlement_id)
        if digest is None:
            return None
        if records == [self.keys.settlement(site, settlement_id)]:
            r, at = self.r.hmget(records[0], "r", "at")
            return StoredSettlement(digest, SettlementResult(True, *decode_stored(r, site, settlement_id, ms_of(at or "")))) if r else None
        pipe = self.r.pipeline(transaction=False)
        for rk in records:
            pipe.hmget(rk, "r", "l", "ps", "at")
        rows: dict[int, ScriptRow] = {}
        rec = 0
        for r, ledger, ps, at in pipe.execute():
            if r is None or ps != "F":
                return None  # an interrupted settlement: only a retry can finish it
            recorded, part_rows = decode_stored(r, site, settlement_id, ms_of(at or ""))
            rec |= recorded
            for entry, row in zip(ledger_entries(ledger), part_rows):
                rows[entry[3]] = row
        return StoredSettlement(digest, SettlementResult(True, bool(rec), [rows[i] for i in sorted(rows)]))

    @_wrap_errors
    def reverse(self, *, site: str, settlement_id: str, now_ms: int, window_ms: int,
                line_indexes: Sequence[int], note: str) -> list[Reversal]:
        """Return lines of a settlement. Two round trips: read the ledgers for the code keys, then
        one atomic script per part (one part on a single node) that re-checks everything against
        the ledger it reads itself."""
        _, records = self._part_records(site, settlement_id)
        if not records:
            raise SettlementNotFound("settlement not found")
        pipe = self.r.pipeline(transaction=False)
        for rk in records:
            pipe.hget(rk, "l")
        ledgers = [ledger_entries(raw) for raw in pipe.execute()]
        owner = {entry[3]: n for n, ledger in enumerate(ledgers) for entry in ledger}
        for i in line_indexes:
            if i not in owner:
                raise BadLineIndex(i)
        if len(records) > 1:
            # A cluster settlement's parts are returned by one script each: a part whose pack was
            # pruned refuses itself (reverse.lua), but the others would already have run. So the
            # packs of every line to give back are looked at first, and a pruned one refuses the
            # whole return before any part runs (prune only drops packs past expiry and window).
            wanted_all = set(line_indexes) or {e[3] for ledger in ledgers for e in ledger}
            for ledger in ledgers:
                for code, accepted, returned, idx in ledger:
                    if idx in wanted_all and accepted > 0 and returned == 0 and self.get_issuance(code) is None:
                        raise PackPruned(idx, code)
        batch = []
        lim = self.limits
        for n, (rk, ledger) in enumerate(zip(records, ledgers)):
            wanted = [i for i in line_indexes if owner[i] == n]
            if line_indexes and not wanted:
                continue
            codes = sorted({e[0] for e in ledger if e[0]})
            keys = [rk, self.keys.audit_for(rk)]
            for code in codes:
                keys += self.keys.code_keys(code)[-2:]  # its state and history
            args = [site, now_ms, window_ms, lim.history_max, lim.audit_arg, note, len(codes), *codes, *wanted]
            batch.append((self._reverse, keys, args))
        lines: list[Reversal] = []
        for res in self.run_scripts(batch, durable=True):
            if isinstance(res, Exception):
                raise res
            lines += [Reversal(i, code, returned, used, bool(already)) for i, code, returned, used, already in json.loads(res)]
        return sorted(lines, key=lambda r: r.line_index)

    # ------------------------------------------------------------------ issuance

    @_wrap_errors
    def upsert_issuance(self, records: Sequence[tuple], *, replace: bool) -> list[int]:
        """records: (code, product, gtin, batch, expiry YYYYMMDD|0, pack_units, manufacturer, status|'').
        Returns per record 0 unchanged, 1 created, 2 updated, 3 conflict, 4 fewer pack units than
        already dispensed (lua/issue.lua). One script call per chunk (per slot on a cluster)."""
        if not records:
            return []
        batch = []
        groups = self._by_slot([r[0] for r in records])
        for positions in groups:
            keys: list[str] = []
            args: list = ["1" if replace else "0"]
            for p in positions:
                code, product, gtin, batch_id, expiry, units, mfr, status = records[p]
                keys += self.keys.code_keys(code)[:2]  # bucket, lots
                args.append(code)
                args += [product, gtin, batch_id, expiry, units, mfr, status]
            batch.append((self._issue, keys, args))
        out = [0] * len(records)
        for positions, res in zip(groups, self.run_scripts(batch)):
            if isinstance(res, Exception):
                raise res
            for p, outcome in zip(positions, res):
                out[p] = int(outcome)
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
        """(entry fields, lot fields, raw kept events) of a code, one consistent read."""
        bkey, lkey, _, hkey = self.keys.code_keys(code)
        entry, lot, events = self.call_script(self.scripts["read"], [bkey, lkey, hkey], [code, "1" if history else "0"])
        return entry_fields(entry), (lot.split(US) if lot else []), events

    @_wrap_errors
    def get_issuance(self, code: str) -> IssuanceRecord | None:
        entry, lot, _ = self._read(code, False)
        return _lot_record(entry, lot)

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
                keys.extend((k[0], k[1], k[3]))  # bucket, lots, history
            calls.append((self._status, keys, [status, now_ms, reason, actor, lim.history_max, lim.audit_arg,
                                               product, batch, *group]))
        out = [""] * len(codes)
        for positions, res in zip(groups, self.run_scripts(calls, durable=True)):
            if isinstance(res, Exception):
                raise res
            for p, prev in zip(positions, res):
                out[p] = prev
        return out

    def batch_codes(self, product: str, batch: str, chunk: int = 500,
                    buckets_per_call: int = 32) -> Iterator[list[str]]:
        """The codes of a batch in chunks (sorted within each), found by a scan of every tag's
        bucket hashes for the batch's lot ids (lua/batch.lua: there is no per-code index). A
        call reads at most `buckets_per_call` hashes (a few milliseconds of Redis time); the
        calls of 64 tags go in one pipelined round trip."""
        by_tag: dict[str, list[str]] = {}
        for bucket, lots in self.keys.buckets():
            by_tag.setdefault(lots, []).append(bucket)
        calls = [(self.scripts["batch"], [lots, *buckets[i:i + buckets_per_call]], [product, batch])
                 for lots, buckets in by_tag.items() for i in range(0, len(buckets), buckets_per_call)]
        buf: list[str] = []
        for start in range(0, len(calls), 64):
            for res in self.run_scripts(calls[start:start + 64]):
                if isinstance(res, Exception):
                    raise res
                buf.extend(code_of(f) for f in res)
            while len(buf) >= chunk:
                yield sorted(buf[:chunk])
                buf = buf[chunk:]
        if buf:
            yield sorted(buf)

    def first_insured(self, codes: Sequence[str], state: KeySpace | None = None) -> dict[str, str]:
        """code -> the pseudonym of its first dispense's buyer (codes without one left out); with
        `state`, as a bulk job's namespace has it. One pipelined round trip."""
        if not codes:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for code in codes:
            pipe.hget(self.keys.code_keys(code, state)[2], code_field(code))
        out = {}
        for code, raw in zip(codes, pipe.execute()):
            fp = _field(entry_fields(raw), "fp")
            if fp:
                out[code] = fp
        return out

    @_wrap_errors
    def code_history(self, code: str) -> CodeHistory:
        """A code's issuance record, dispense state and kept events (oldest first), one round trip."""
        return _history(*self._read(code, True))


def _by_slot(lines, codes) -> list[tuple[str, list, list[int], list[str]]]:
    """A cluster's parts of one call (a settlement's or a delivery's): per hash slot its first
    code ('' for a call of malformed lines only), its lines with the code index renumbered
    within the part (a line's first field; 0, malformed, touches no key and rides with the first
    part), their indexes in the call, and its codes."""
    by_slot: dict[int, list[int]] = {}
    for u, code in enumerate(codes, 1):
        by_slot.setdefault(slot_of(code), []).append(u)
    groups = list(by_slot.values()) or [[]]
    local = {u: (g, j) for g in groups for j, u in enumerate(g, 1)}
    parts = []
    for g in groups:
        part_lines, idx = [], []
        for i, line in enumerate(lines):
            u = line[0]
            if (u and local[u][0] is g) or (not u and g is groups[0]):
                part_lines.append((local[u][1] if u else 0, *line[1:]))
                idx.append(i)
        parts.append((codes[g[0] - 1] if g else "", part_lines, idx, [codes[u - 1] for u in g]))
    return parts


def _receive_rows(text: str) -> list[ReceiveRow]:
    """receive.lua's answer (RS before each line, US between its fields)."""
    rows = []
    for part in text.split(RS)[1:]:
        v, st, p, ex, fs, fa, before, reason = part.split(US)
        rows.append(ReceiveRow(v, st, p, int(ex or 0), fs, int(fa or 0), before, reason))
    return rows


def _event(raw: str) -> CodeEvent:
    e = json.loads(raw)
    return CodeEvent(e["t"], int(e["a"]), e["s"], e["i"], int(e["l"]), int(e["u"]), str(e["x"]), e.get("p", ""))


def ledger_entries(text: str | None) -> list[list]:
    """A stored ledger's lines [code, units taken, units returned, line index], its codes unpacked
    (layout.py's packed form; the Lua twin is _state.lua's ledger_read)."""
    lines: list[list] = []
    for pos, part in enumerate((text or "").split(RS)[1:]):
        f = part.split(US)
        f += [""] * (4 - len(f))
        lines.append([code_of(f[0]) if f[0] else "", int(f[1] or 0), int(f[2] or 0), int(f[3]) if f[3] else pos])
    return lines


def entry_fields(text: str | None) -> list[str]:
    """A stored entry's fields (ENTRY_FIELDS order, trailing empty ones left off), its packed time
    and pseudonym unpacked (rules/packing.py) and a plain first dispense's '=' expanded (the Lua
    twin is _state.lua's entry_read)."""
    if not text:
        return []
    entry = text.split(US)
    ev = _E["ev"]
    if ev < len(entry) and entry[ev] == "=":  # the plain first dispense (_state.lua entry_write)
        entry += [""] * (_E["fu"] + 1 - len(entry))
        entry[ev], entry[_E["fd"]], entry[_E["fu"]] = "1", "0", entry[_E["u"]]
    fa, fp = _E["fa"], _E["fp"]
    if fa < len(entry) and entry[fa]:
        entry[fa] = str(ms_of(entry[fa]))
    if fp < len(entry) and entry[fp]:
        entry[fp] = hex128_of(entry[fp])
    for i in _ID_FIELDS:
        if i < len(entry) and entry[i]:
            entry[i] = id_of(entry[i])
    return entry


def _field(entry: list[str], name: str) -> str:
    i = _E[name]
    return entry[i] if i < len(entry) else ""


def _lot_record(entry: list[str], lot: list[str]) -> IssuanceRecord | None:
    """A code's entry and its lot's fields -> the issuance record, None if not issued."""
    if not lot:
        return None
    return IssuanceRecord(lot[_LOT["product_id"]], lot[_LOT["gtin"]], lot[_LOT["batch"]], int(lot[_LOT["expiry"]] or 0),
                          int(lot[_LOT["pack_units"]] or 1), lot[_LOT["manufacturer"]], _field(entry, "status") or "ACTIVE")


def _history(entry: list[str], lot: list[str], events: list[str]) -> CodeHistory:
    """The history of a code from its entry, lot and list. The first-ever DISPENSED
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


def now_ms() -> int:
    return time.time_ns() // 1_000_000
