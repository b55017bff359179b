"""The store: the only module that speaks Redis.

Every operation a verdict depends on is one Lua script call (loaded once, called by SHA), so the
check and the mark of a code are atomic and a settlement costs one round trip, whatever its size.
The scripts live in server/lua/; the key layout in keys.py.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Iterator, Sequence

import redis

from .errors import (BadLineIndex, NotFound, ReturnWindowClosed, SettlementConflict,
                     SettlementNotFound, StoreError, StoreUnavailable)
from .keys import KeySpace
from .verdicts import lua_precedence

log = logging.getLogger("tracecode.store")


def _script_text(name: str) -> str:
    text = resources.files("tracecode.server").joinpath("lua", name).read_text()
    return text.replace("--@PRECEDENCE@--", lua_precedence())


@dataclass(frozen=True)
class StoreLimits:
    audit_max: int = 1_000_000  # per audit stream (there are keys.BUCKETS of them); approximate trim
    history_max: int = 256  # events kept per code; the total is counted past it
    settlement_ttl_s: int = 400 * 86400  # idempotency record and return ledger lifetime


# Issuance hash field -> public name.
_ISSUANCE_FIELDS = (("p", "product_id"), ("g", "gtin"), ("b", "batch"), ("e", "expiry"),
                    ("n", "pack_units"), ("m", "manufacturer"), ("s", "status"))


def _wrap_errors(fn):
    """Translate redis-py failures into store errors at the boundary, once."""
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc
        except redis.ResponseError as exc:
            msg = str(exc)
            if msg.startswith("TCCONFLICT"):
                raise SettlementConflict(msg.partition(" ")[2]) from None
            if msg.startswith("TCNOTFOUND"):
                raise SettlementNotFound(msg.partition(" ")[2]) from None
            if msg.startswith("TCWINDOW"):
                raise ReturnWindowClosed(int(msg.split()[1])) from None
            if msg.startswith("TCBADLINE"):
                raise BadLineIndex(int(msg.split()[1])) from None
            if "READONLY" in msg or "CLUSTERDOWN" in msg or "TRYAGAIN" in msg:
                raise StoreUnavailable(msg) from exc
            raise
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


class Store:
    def __init__(self, client: redis.Redis, keys: KeySpace | None = None,
                 limits: StoreLimits | None = None):
        self.r = client
        self.keys = keys or KeySpace()
        self.limits = limits or StoreLimits()
        self._verify = client.register_script(_script_text("verify.lua"))
        self._reverse = client.register_script(_script_text("reverse.lua"))
        self._issue = client.register_script(_script_text("issue.lua"))
        self._status = client.register_script(_script_text("status.lua"))

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0, max_connections: int = 64, **kw) -> "Store":
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=30, max_connections=max_connections,
        )
        return cls(client, **kw)

    def close(self) -> None:
        self.r.close()

    @_wrap_errors
    def ping(self) -> bool:
        return bool(self.r.ping())

    # ------------------------------------------------------------------ settlements

    def _verify_call(self, *, dispense: bool, site: str, settlement_id: str, settled_at_ms: int,
                     settle_day: int, digest: str, all_or_nothing: bool,
                     lines: Sequence[tuple[int, str, int, str]], codes: Sequence[str],
                     state: KeySpace | None = None, state_ttl_s: int = 0) -> tuple[list, list]:
        """KEYS and ARGV of one verify.lua call (layout documented in the script).

        `state`, when given, holds the dispense state, history, settlement records and audit of a
        separate namespace (a bulk REPLAY job); issuance is always read from the live keys. Both
        share hash tags, so they stay in one slot. A separate namespace logs no events."""
        sk = state or self.keys
        skey = sk.settlement(site, settlement_id)
        keys = [skey, sk.audit_for(skey)]
        for code in codes:
            _, dkey, hkey = sk.code_keys(code)
            keys += [self.keys.issuance(code), dkey, hkey]
        lim = self.limits
        args = ["D" if dispense else "C", site, settlement_id, settled_at_ms, settle_day, digest,
                "A" if all_or_nothing else "R", 0 if state else lim.audit_max, lim.history_max,
                state_ttl_s or lim.settlement_ttl_s, len(lines), state_ttl_s]
        for line in lines:
            args.extend(line)
        args.extend(codes)
        return keys, args

    @_wrap_errors
    def verify(self, **call) -> tuple[bool, str]:
        """Judge (and when `dispense`, mark) one settlement in one round trip.

        lines: per line (code index 1..len(codes), or 0 for a malformed scan; billed product;
        units, 0 = whole pack; malformed reason). codes: the distinct canonical codes.
        Returns (replayed, results-json) as documented in lua/verify.lua.
        """
        keys, args = self._verify_call(**call)
        replayed, out = self._verify(keys=keys, args=args)
        return bool(replayed), out

    @_wrap_errors
    def verify_batch(self, calls: Sequence[dict]) -> list[tuple[bool, str] | StoreError]:
        """Many settlements in one pipelined round trip, executed in order (bulk jobs). A
        settlement's own failure (a reused id with another body) comes back in its slot."""
        pipe = self.r.pipeline(transaction=False)
        for call in calls:
            keys, args = self._verify_call(**call)
            self._verify(keys=keys, args=args, client=pipe)
        out: list = []
        for res in pipe.execute(raise_on_error=False):
            if isinstance(res, redis.ResponseError):
                msg = str(res)
                if not msg.startswith("TCCONFLICT"):
                    raise res
                out.append(SettlementConflict(msg.partition(" ")[2]))
            elif isinstance(res, Exception):
                raise res
            else:
                out.append((bool(res[0]), res[1]))
        return out

    @_wrap_errors
    def drop_namespace(self, keys: KeySpace) -> int:
        """Delete every key of a (bulk job) namespace; returns how many."""
        if keys.prefix == self.keys.prefix:
            raise ValueError("refusing to drop the live namespace")
        deleted = 0
        batch: list[str] = []
        for key in self.r.scan_iter(match=f"{keys.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self.r.unlink(*batch)
                batch = []
        if batch:
            deleted += self.r.unlink(*batch)
        return deleted

    @_wrap_errors
    def stored_settlement(self, site: str, settlement_id: str) -> tuple[str, str] | None:
        """(digest, results-json) of a recorded settlement, or None."""
        d, r = self.r.hmget(self.keys.settlement(site, settlement_id), "d", "r")
        return (d, r) if d else None

    @_wrap_errors
    def reverse(self, *, site: str, settlement_id: str, now_ms: int, window_ms: int,
                line_indexes: Sequence[int], note: str) -> list[tuple[int, str, int, int, bool]]:
        """Return lines of a settlement. Two round trips: read the ledger for the code keys, then
        one atomic script that re-checks everything against the ledger it reads itself."""
        skey = self.keys.settlement(site, settlement_id)
        ledger = self.r.hget(skey, "l")
        if ledger is None:
            raise SettlementNotFound("settlement not found")
        codes = sorted({line[0] for line in json.loads(ledger) if line[0]})
        keys = [skey, self.keys.audit_for(skey)]
        for code in codes:
            _, dkey, hkey = self.keys.code_keys(code)
            keys += [dkey, hkey]
        lim = self.limits
        args = [site, now_ms, window_ms, lim.history_max, lim.audit_max, note, len(codes), *codes,
                *line_indexes]
        out = json.loads(self._reverse(keys=keys, args=args))
        return [(i, code, returned, used, bool(already)) for i, code, returned, used, already in out]

    # ------------------------------------------------------------------ issuance

    @_wrap_errors
    def upsert_issuance(self, records: Sequence[tuple], *, replace: bool) -> list[int]:
        """records: (code, product, gtin, batch, expiry YYYYMMDD|0, pack_units, manufacturer, status|'').
        Returns per record 0 unchanged, 1 created, 2 updated, 3 conflict. One script call per
        chunk; the batch index (for recalls) is written in the same round trip."""
        if not records:
            return []
        keys, args = [], ["1" if replace else "0"]
        for code, product, gtin, batch, expiry, units, mfr, status in records:
            keys.append(self.keys.issuance(code))
            args += [product, gtin, batch, expiry, units, mfr, status]
        pipe = self.r.pipeline(transaction=False)
        self._issue(keys=keys, args=args, client=pipe)
        for code, product, _, batch, *_ in records:
            if batch:
                pipe.sadd(self.keys.batch(product, batch), code)
        return [int(x) for x in pipe.execute()[0]]

    @_wrap_errors
    def get_issuance(self, code: str) -> dict | None:
        values = self.r.hmget(self.keys.issuance(code), *(f for f, _ in _ISSUANCE_FIELDS))
        if values[0] is None:
            return None
        return {name: v for (_, name), v in zip(_ISSUANCE_FIELDS, values)}

    @_wrap_errors
    def set_status(self, codes: Sequence[str], status: str, *, now_ms: int, reason: str,
                   actor: str) -> list[str]:
        """Set the status of codes (one atomic call per chunk); returns each previous status,
        '' for a code that was never issued (left untouched)."""
        if not codes:
            return []
        first = self.keys.issuance(codes[0])
        keys = [self.keys.audit_for(first)]
        for code in codes:
            keys.extend(self.keys.code_keys(code))
        lim = self.limits
        args = [status, now_ms, reason, actor, lim.history_max, lim.audit_max, *codes]
        return list(self._status(keys=keys, args=args))

    @_wrap_errors
    def batch_codes(self, product: str, batch: str, chunk: int = 500) -> Iterator[list[str]]:
        key = self.keys.batch(product, batch)
        buf: list[str] = []
        for code in self.r.sscan_iter(key, count=chunk):
            buf.append(code)
            if len(buf) >= chunk:
                yield sorted(buf)
                buf = []
        if buf:
            yield sorted(buf)

    @_wrap_errors
    def code_history(self, code: str) -> tuple[dict | None, dict, list[dict]]:
        """(issuance record or None, dispense state, events oldest first) in one round trip."""
        ikey, dkey, hkey = self.keys.code_keys(code)
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(ikey, *(f for f, _ in _ISSUANCE_FIELDS))
        pipe.hgetall(dkey)
        pipe.lrange(hkey, 0, -1)
        values, state, events = pipe.execute()
        record = None
        if values[0] is not None:
            record = {name: v for (_, name), v in zip(_ISSUANCE_FIELDS, values)}
        return record, state, [json.loads(e) for e in events]

    # ------------------------------------------------------------------ audit

    @_wrap_errors
    def audit_events(self, count_per_stream: int = 1000) -> Iterable[tuple[str, dict]]:
        """Every audit event of every bucket (for tests and small exports): (stream id, fields)."""
        pipe = self.r.pipeline(transaction=False)
        streams = self.keys.audit_streams()
        for s in streams:
            pipe.xrange(s, count=count_per_stream)
        for entries in pipe.execute():
            yield from entries


def now_ms() -> int:
    return time.time_ns() // 1_000_000
