"""The store's sanction half: sanction entries, their indexes and change stream in Redis.

Part of the store package (the only code that speaks Redis): it runs
lua/sanction.lua through the Store's script machinery (one atomic call per change, retried
after a failover like every other script) and reads the entries back. The rules live in
sanctions.py; the key layout in keys.py. The settlement path's check is not here: on one node it
is lua/gate.lua inside the settlement's own verify call; on a cluster the server's SanctionView,
fed by `snapshot` and `changes` below.

May import: redis, the store's own modules, and the plain modules errors and sanctions (the
rules' typed entries).
"""
from __future__ import annotations

from typing import Sequence

import redis

from ..errors import NotFound, StoreUnavailable
from ..sanctions import INSURED, SITE, Notice, Sanction, SetRequest, lifted
from .keys import KeySpace
from .store import Store, wrap_errors

CHANGE_STREAM_MAX = 100_000  # approximate; a view behind by more than this reloads (see changes)


def _subject_key(keys: KeySpace, subject: str, subject_id: str) -> str:
    return keys.sanction(f"{'site' if subject == SITE else 'ins'}:{subject_id}")


def _entry(req: SetRequest, now_ms: int) -> Sanction:
    """The entry a SetSanction request creates at `now_ms` (unset valid_from: now)."""
    return Sanction(req.sanction_id(), req.kind, req.subject, req.subject_id,
                    now_ms if req.valid_from_ms is None else req.valid_from_ms, req.valid_until_ms,
                    req.reason, req.reference, req.actor, now_ms, req.request_id, req.digest())


class SanctionStore:
    def __init__(self, store: Store):
        self.store = store
        self.r = store.r
        self.keys = store.keys

    def _script_keys(self, s: Sanction) -> list[str]:
        k = self.keys
        return [k.sanction("all"), k.sanction("rq"), _subject_key(k, s.subject, s.subject_id),
                k.sanction("log"), k.sanction_audit()]

    def _audit_args(self, s: Sanction, now_ms: int, actor: str, reason: str) -> list:
        return [now_ms, self.store.limits.audit_arg, CHANGE_STREAM_MAX, s.kind,
                s.subject_id if s.subject == SITE else "", s.subject_id if s.subject == INSURED else "",
                reason, s.reference, actor]

    def _set_args(self, req: SetRequest, entry: Sanction, now_ms: int) -> list:
        return ["S", req.request_id, entry.sanction_id, entry.digest, entry.to_json(),
                *self._audit_args(entry, now_ms, req.actor, req.reason)]

    @wrap_errors
    def set(self, req: SetRequest, *, now_ms: int) -> tuple[bool, Sanction]:
        """Store a new sanction; (False, the stored one) for a repeated request id with the same
        body, SettlementConflict for another body under it."""
        entry = _entry(req, now_ms)
        changed, text = self.store.call_script(self.store.scripts["sanction"], self._script_keys(entry),
                                         self._set_args(req, entry, now_ms), durable=True)
        return bool(changed), Sanction.from_json(text)

    @wrap_errors
    def lift(self, sanction_id: str, *, now_ms: int, by: str, reason: str) -> tuple[bool, Sanction]:
        """Lift a sanction; (False, it) when already lifted or ended. NotFound when unknown."""
        for _ in range(5):
            current = self.r.hget(self.keys.sanction("all"), sanction_id)
            if current is None:
                raise NotFound(f"no sanction {sanction_id}")
            s = Sanction.from_json(current)
            if s.lifted_at_ms or (s.valid_until_ms and s.valid_until_ms <= now_ms):
                return False, s
            new = lifted(s, now_ms=now_ms, by=by, reason=reason)
            # ARGV[5] is unused by 'L' (the layouts of both operations share ARGV[6] onwards).
            args = ["L", sanction_id, current, new.to_json(), "", *self._audit_args(s, now_ms, by, reason)]
            try:
                _, text = self.store.call_script(self.store.scripts["sanction"], self._script_keys(s), args,
                                           durable=True)
            except redis.ResponseError as exc:
                if str(exc).startswith("TCRETRY"):
                    continue  # lifted or replaced by another call since we read it: read again
                raise
            return True, Sanction.from_json(text)
        raise StoreUnavailable("sanction changed repeatedly while lifting it; retry")

    @wrap_errors
    def get(self, sanction_id: str) -> Sanction | None:
        text = self.r.hget(self.keys.sanction("all"), sanction_id)
        return Sanction.from_json(text) if text else None

    @wrap_errors
    def all(self) -> list[Sanction]:
        """Every entry (HSCAN, a page at a time)."""
        return [Sanction.from_json(v) for _, v in self.r.hscan_iter(self.keys.sanction("all"), count=1000)]

    # ------------------------------------------------------------------ the view's feed

    @wrap_errors
    def snapshot(self) -> tuple[str, list[Sanction]]:
        """(change stream position, every entry): the position first, so a change made while the
        entries are read is read again from the stream."""
        last = self.r.xrevrange(self.keys.sanction("log"), count=1)
        cursor = last[0][0] if last else "0-0"
        return cursor, self.all()

    @wrap_errors
    def changes(self, cursor: str, block_ms: int) -> tuple[str, list[Sanction]]:
        """The entries changed after `cursor`, waiting up to block_ms for one; (new cursor, entries)."""
        key = self.keys.sanction("log")
        if self.store.cluster:
            # Blocking reads go to the one node serving the stream's slot, on a connection of its own.
            node = self.r.get_node_from_key(key)
            client = self.r.get_redis_connection(node)
        else:
            client = self.r
        replies = client.xread({key: cursor}, count=1000, block=block_ms)
        entries = []
        for _, messages in replies or []:
            for msg_id, fields in messages:
                cursor = msg_id
                entries.append(Sanction.from_json(fields["e"]))
        return cursor, entries

    # ------------------------------------------------------------------ settlements

    @wrap_errors
    def audit_refusal(self, site: str, settlement_id: str, insured: str, notice: Notice, now_ms: int) -> None:
        """A refusal decided by the view (cluster), in the audit stream of the settlement's slot,
        with the same fields gate.lua writes on one node."""
        skey = self.keys.settlement(site, settlement_id)
        self.r.xadd(self.keys.audit_for(skey),
                    {"t": "REFUSED", "c": "", "s": site, "i": settlement_id, "l": -1, "u": 0,
                     "x": notice.reason, "a": now_ms, "n": notice.sanction_id, "k": notice.kind, "p": insured},
                    # Archived: only the hard bound (lua/_audit.lua; a drop here is not counted: rare, cluster only).
                    maxlen=self.store.limits.audit_bound or self.store.limits.audit_max, approximate=True)

    @wrap_errors
    def first_insured(self, codes: Sequence[str], state: KeySpace | None = None) -> dict[str, str]:
        """code -> the pseudonym of its first dispense's buyer (codes without one left out)."""
        return self.store.first_insured(codes, state)

    @wrap_errors
    def set_many(self, reqs: Sequence[SetRequest], *, now_ms: int, batch: int = 1000) -> int:
        """SetSanction for many requests, pipelined `batch` script calls per round trip (a ledger
        import, the benchmark's 110,000 sanctions); returns how many were new."""
        script, new = self.store.scripts["sanction"], 0
        for start in range(0, len(reqs), batch):
            calls = []
            for req in reqs[start:start + batch]:
                entry = _entry(req, now_ms)
                calls.append((script, self._script_keys(entry), self._set_args(req, entry, now_ms)))
            for res in self.store.run_scripts(calls):
                if isinstance(res, Exception):
                    raise res
                new += int(res[0])
        return new
