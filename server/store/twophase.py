"""Settlements on a Redis Cluster: each settlement's codes are split by hash slot into parts, and
each part is judged by one atomic script call in its own slot. Named steps over typed state:

1. **claim** the settlement id: its body digest on the settlement's own key (claim.lua); a claim
   already holding another digest is a SettlementConflict, one holding a recorded decision is a
   retry that only has to apply it;
2. **prepare** every part of every undecided settlement, pipelined (verify.lua): a settlement
   that is ALL_OR_NOTHING over several slots is judged in mode 'P' and, when all lines of a part
   are OK, that part's units are reserved (a part left prepared by a dead coordinator is judged
   afresh); any other settlement is judged and recorded at once ('D'), or only judged ('C');
3. **decide**, for every settlement with prepared parts: commit ('K') when every part was
   prepared within half the reservation's life, else abort ('X'); recorded once (decide.lua,
   the first decision wins);
4. **commit**: apply the recorded decision to every prepared part (commit.lua), which never takes
   units that another settlement holds or took (an expired reservation: docs/scaling.md);
5. **merge** the parts' rows back into request order.

The settlement's own record is the commit's log: a retry that finds a decision recorded applies
it without judging again; one that finds none prepares again. `replayed` is true only when
nothing was written by this call.

May import: what store.py may (redis, the plain modules of tracecode.server, the rules core).
It drives a Store through its public methods; store.py imports this module, never the reverse.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import redis

from ..errors import SettlementConflict, from_script_error
from ..failpoints import failpoint
from .types import ScriptRow, SettlementCall, SettlementResult, decode_stored

if TYPE_CHECKING:  # the store hands itself in; this module never imports store.py at run time
    from .store import Store

log = logging.getLogger("tracecode.store")

__all__ = ["Part", "ShardedSettlement", "TwoPhase", "conflict_or"]


def conflict_or(res, convert: Callable | None):
    """A script's answer in a pipeline: its SettlementConflict as a value (one settlement of a
    batch failing alone), other errors raised, anything else converted."""
    if isinstance(res, redis.ResponseError):
        domain = from_script_error(str(res))
        if isinstance(domain, SettlementConflict):
            return domain
        raise domain if domain is not None else res
    if isinstance(res, Exception):
        raise res
    return convert(res) if convert else res


@dataclass(slots=True)
class Part:
    """One slot's share of a settlement (Store.parts_of) and, once judged, its answer."""
    record: str  # the part's record key, in its slot
    lines: list  # the script's lines of this part (code indexes local to the part)
    idx: list[int]  # each line's position in the request
    codes: list[str]
    replayed: bool = True  # nothing was written for this part by this call
    recorded: bool = False
    rows: list[ScriptRow] = field(default_factory=list)
    state: str = ""  # 'F' final, 'P' prepared (awaiting the decision), 'E' committed too late


@dataclass(slots=True)
class ShardedSettlement:
    call: SettlementCall
    parts: list[Part]
    outcome: SettlementResult | SettlementConflict | None = None  # set once settled or refused
    decision: str = ""  # the recorded decision: 'K' commit, 'X' abort ('' none yet)
    judged: bool = False  # its parts carry answers of this call (prepare) or await a recorded decision
    credits: list = field(default_factory=list)  # live rules: [first buyer, code] of its DUPLICATEs

    @property
    def two_phase(self) -> bool:
        return self.call.dispense and self.call.all_or_nothing and len(self.parts) > 1

    @property
    def open(self) -> bool:
        return self.outcome is None


class TwoPhase:
    """The steps of the module docstring over one batch of settlements."""

    def __init__(self, store: "Store"):
        self.store = store

    def run(self, calls: Sequence[SettlementCall]) -> list[SettlementResult | SettlementConflict]:
        batch = [ShardedSettlement(c, [Part(*p) for p in self.store.parts_of(c)]) for c in calls]
        durable = any(c.dispense and not c.state for c in calls)
        self.claim(batch)
        started = time.monotonic()
        self.prepare(batch, durable)
        failpoint("after_prepare")
        in_time = (time.monotonic() - started) * 1000 < self.store.limits.reservation_ms / 2
        self.decide(batch, in_time, durable)
        failpoint("after_decide")
        self.commit(batch, durable)
        for s in batch:
            if s.open and s.judged:
                s.outcome = self.merge(s)
        return [s.outcome for s in batch]  # type: ignore[misc]  # every settlement has one by now

    def claim(self, batch: list[ShardedSettlement]) -> None:
        store = self.store
        claims = []
        for s in batch:
            c = s.call
            if not c.dispense:
                continue
            sk = c.state or store.keys
            skey = sk.settlement(c.site, c.settlement_id)
            args = [c.digest, json.dumps([p.record for p in s.parts]), c.site, c.settlement_id,
                    c.settled_at_ms, c.state_ttl_s or store.limits.settlement_ttl_s]
            claims.append((s, (store.scripts["claim"], [skey, sk.registry_for(skey)] if c.state else [skey], args)))
        if not claims:
            return
        for (s, _), res in zip(claims, store.run_scripts([call for _, call in claims])):
            if isinstance(res, Exception):
                raise res
            mine, decision = res
            if not mine:
                s.outcome = SettlementConflict("settlement id already used with a different request body")
            elif decision:
                s.decision = decision
                # Decided by an earlier attempt: every part gets the decision, nothing is judged again.
                s.judged = True
                for p in s.parts:
                    p.state = "P"

    def prepare(self, batch: list[ShardedSettlement], durable: bool) -> None:
        store = self.store
        calls, where = [], []
        for s in batch:
            if not s.open or s.decision:
                continue
            c = s.call
            mode = "P" if s.two_phase else ("D" if c.dispense else "C")
            for p in s.parts:
                keys, args = store.verify_keys_args(c, mode, p.record, p.lines, p.idx, p.codes)
                calls.append((store.scripts["verify"], keys, args))
                where.append((s, p))
        for (s, p), res in zip(where, store.run_scripts(calls, durable=durable) if calls else []):
            if not s.open:
                continue
            if isinstance(res, Exception):
                s.outcome = conflict_or(res, None)
                continue
            c = s.call
            s.judged = True
            p.replayed, p.state = bool(res[0]), res[2]
            if len(res) > 4:  # the first buyers of this part's DUPLICATEs (live rules, lua/gate.lua)
                s.credits += json.loads(res[4]).get("c") or []
            p.recorded, p.rows = decode_stored(res[1], c.site, c.settlement_id, c.settled_at_ms)

    def decide(self, batch: list[ShardedSettlement], in_time: bool, durable: bool) -> None:
        store = self.store
        undecided = [s for s in batch if s.open and not s.decision and any(p.state == "P" for p in s.parts)]
        if not undecided:
            return
        asks = []
        for s in undecided:
            ok = in_time and all(p.state == "P" for p in s.parts)
            sk = s.call.state or store.keys
            asks.append((store.scripts["decide"], [sk.settlement(s.call.site, s.call.settlement_id)], ["K" if ok else "X"]))
        for s, res in zip(undecided, store.run_scripts(asks, durable=durable)):
            if isinstance(res, Exception):
                raise res
            s.decision = res

    def commit(self, batch: list[ShardedSettlement], durable: bool) -> None:
        store = self.store
        todo = [(s, p) for s in batch if s.open and s.decision for p in s.parts if p.state == "P"]
        if not todo:
            return
        calls = []
        for s, p in todo:
            sk = s.call.state or store.keys
            keys = [p.record, sk.audit_for(p.record)]
            for code in p.codes:  # the live issuance (its pack units), the namespace's state
                keys += store.keys.code_keys(code, s.call.state)
            calls.append((store.scripts["commit"], keys,
                          [s.decision, store.limits.history_max, store.limits.audit_arg, *p.codes]))
        for (s, p), res in zip(todo, store.run_scripts(calls, durable=durable)):
            if isinstance(res, Exception):
                raise res
            c = s.call
            p.recorded, p.rows = decode_stored(res[0], c.site, c.settlement_id, c.settled_at_ms)
            p.state = res[1]
            if int(res[2]):
                p.replayed = False  # this call wrote it: not a replay
            if p.state == "E":
                log.warning("settlement %s of site %s: a part could not be committed after its reservation "
                            "expired (packs taken meanwhile); reported as not recorded", c.settlement_id, c.site)

    @staticmethod
    def merge(s: ShardedSettlement) -> SettlementResult:
        rows: list = [None] * len(s.call.lines)
        for p in s.parts:
            for i, row in zip(p.idx, p.rows):
                rows[i] = row
        replayed = all(p.replayed for p in s.parts)
        live = {"c": s.credits} if s.call.live and s.call.dispense and not replayed else None
        return SettlementResult(replayed, any(p.recorded for p in s.parts), rows, live=live)
