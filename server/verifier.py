"""The verifier: the rules of docs/verification.md between the servicer and the store.

It validates a settlement, canonicalises every scan with the codec (one batch call), hands the
distinct codes to the store for one atomic judge-and-mark (a `SettlementCall`), and turns the
store's decoded rows into verdicts with reasons a pharmacist can act on.

May import: the codec, the plain modules (errors, verdicts) and the store; never grpc or the
generated stubs. It is given the rule settings it needs (`RulesSettings`), not the whole Config.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Sequence
from zoneinfo import ZoneInfo

from tracecode import codec
from tracecode.codec import wire

from .config import Config
from .errors import InvalidRequest, Sanctioned, SettlementConflict
from .store import Store, now_ms
from .store.types import CodeHistory, PlanLine, SettlementCall, SettlementResult

if TYPE_CHECKING:  # the service holds the verifier's collaborators, not the reverse
    from .sanction_service import SanctionService

# Site and settlement ids end up in keys, logs and reports: a conservative alphabet.
_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}\Z")
# Free-text fields (product ids, batches, manufacturers) take any printable text, never control
# characters: C0, DEL and C1. Those would corrupt logs and CSV exports and, in older digests,
# let two different bodies look alike.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_PRODUCT_ID = 64


def text_problem(value: str, limit: int, what: str, required: bool = True) -> str | None:
    """Why a free-text field is not acceptable, or None: required, at most `limit` characters, no
    control character. Shared by settlement lines and issuance records (same limits)."""
    if not value:
        return f"required: {what}" if required else None
    if len(value) > limit:
        return f"{len(value)} characters, at most {limit}"
    if value.isascii() and value.isprintable():  # U+0020..U+007E only: none of _CONTROL's
        return None
    bad = _CONTROL.search(value)
    if bad:
        return f"control character U+{ord(bad.group()):04X} at position {bad.start() + 1}"
    return None
# Instants a settlement may carry (1970-01-01 .. 2100-01-01 UTC): a protobuf Timestamp holds far
# more (years 1..9999 and beyond), which the calendar of the expiry check cannot represent.
MIN_TIME_MS, MAX_TIME_MS = 0, 4_102_444_800_000


@dataclass(frozen=True, slots=True)
class RulesSettings:
    """What the rules depend on (docs/verification.md), taken from Config by from_config."""
    timezone: str = "Asia/Shanghai"
    clock_skew_s: int = 600
    return_window_days: float = 10.0
    max_lines: int = 200
    max_code_length: int = 512
    max_units: int = 100_000
    cn_prefixes: str = "8"
    gs_substitutes: str = ""

    @classmethod
    def from_config(cls, config: Config) -> "RulesSettings":
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})


@dataclass(slots=True)
class Line:
    raw_code: str
    product_id: str
    units: int = 0  # 0 = the whole pack


@dataclass(slots=True)
class LineOutcome:
    verdict: str
    canonical_code: str
    reason: str
    units_accepted: int = 0
    units_used: int = 0
    pack_units: int = 0
    status: str = ""
    issued_product_id: str = ""
    first_site_id: str = ""
    first_settlement_id: str = ""
    first_settled_at_ms: int = 0
    attempts: int = 0

    @property
    def units_remaining(self) -> int:
        return max(self.pack_units - self.units_used, 0)


@dataclass(slots=True)
class BulkChunk:
    """A prepared bulk chunk: per settlement its outcome or error (filled in by bulk_finish), the
    store calls, and where each call's answer goes."""
    out: list
    calls: list[SettlementCall]
    where: list[int]
    keys_of: list[list[str]]


@dataclass(slots=True)
class SettlementOutcome:
    results: list[LineOutcome]
    recorded: bool
    replayed: bool
    # Bulk jobs: the sanctions in force at the settlement's own settled_at (sanctions.Notice),
    # and the settlement's insured pseudonym.
    sanctions: list = field(default_factory=list)
    insured: str = ""


@dataclass(slots=True)
class CheckOutcome:
    results: list[LineOutcome]
    sanctions: list  # sanctions.Notice in force against the site or person now


def _fmt_ms(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="seconds")


def _fmt_day(day: int) -> str:
    s = str(day)
    return f"{s[:4]}-{s[4:6]}-{s[6:]}" if len(s) == 8 else s


def validate_settlement(rules: RulesSettings, site_id: str, settlement_id: str | None, lines: Sequence[Line],
                    at_ms: int | None = None, at_field: str = "settled_at") -> None:
    """InvalidRequest naming every field of a settlement that breaks the rules (settlement_id
    None: a call without one, e.g. CheckCodes). No store involved: the leads engine judges
    rejected rows by this very function."""
    bad: list[tuple[str, str]] = []
    if at_ms is not None and not MIN_TIME_MS <= at_ms < MAX_TIME_MS:
        bad.append((at_field, "outside 1970-01-01 .. 2100-01-01 UTC"))
    if not _ID.match(site_id or ""):
        bad.append(("site_id", "required: 1-64 characters of A-Z a-z 0-9 . _ -"))
    if settlement_id is not None and not _ID.match(settlement_id or ""):
        bad.append(("settlement_id", "required: 1-64 characters of A-Z a-z 0-9 . _ -"))
    if not lines:
        bad.append(("lines", "at least one line is required"))
    elif len(lines) > rules.max_lines:
        bad.append(("lines", f"{len(lines)} lines, at most {rules.max_lines} per settlement"))
    for i, ln in enumerate(lines[: rules.max_lines]):
        problem = text_problem(ln.product_id, MAX_PRODUCT_ID, "the billed product id")
        if problem:
            bad.append((f"lines[{i}].product_id", problem))
        if len(ln.raw_code) > rules.max_code_length:
            bad.append((f"lines[{i}].raw_code",
                        f"{len(ln.raw_code)} characters, at most {rules.max_code_length}"))
        if ln.units < 0 or ln.units > rules.max_units:
            bad.append((f"lines[{i}].units", f"{ln.units} outside 0..{rules.max_units}"))
    if bad:
        raise InvalidRequest(bad)


class Verifier:
    def __init__(self, store: Store, rules: RulesSettings | Config):
        self.store = store
        if not isinstance(rules, RulesSettings):
            rules = RulesSettings.from_config(rules)
        self.rules = rules
        self.tz = ZoneInfo(rules.timezone)
        subs = tuple(s for s in rules.gs_substitutes.split(",") if s)
        self.profile = codec.Profile(gs_substitutes=subs, cn_prefixes=rules.cn_prefixes,
                                     max_length=rules.max_code_length)
        self._day = (0, 0, 0)  # settle_day's last day: [start ms, end ms), YYYYMMDD
        # sanction_service.SanctionService (the server sets it): pseudonyms and the sanction
        # checks the store's atomic call does not make (a cluster's, bulk jobs'). None: none.
        self.sanctions: SanctionService | None = None

    # ------------------------------------------------------------------ parsing

    def canonical(self, raw: str) -> str:
        """The canonical key of one scan, or InvalidRequest naming why it is malformed."""
        parsed = codec.parse(raw, self.profile)
        if not parsed[codec.KEY]:
            raise InvalidRequest([("raw_code", parsed[codec.REASON])])
        return parsed[codec.KEY]

    def history(self, raw: str) -> tuple[str, CodeHistory]:
        """A code's canonical key, issuance record, dispense state and events, from any scan form."""
        code = self.canonical(raw)
        return code, self.store.code_history(code)

    # ------------------------------------------------------------------ bulk jobs' store access

    def job_namespace(self, job_id: str):
        """The key namespace of a bulk REPLAY job (its own dispense state)."""
        return self.store.keys.job(f"{self.store.keys.prefix}-job-{job_id}")

    def bulk_run(self, prepared: "BulkChunk") -> list:
        """The store's answers to a prepared chunk's calls, one pipelined round trip."""
        return self.store.verify_batch(self.store.prepare_batch(prepared.calls)) if prepared.calls else []

    def drop_job(self, namespace) -> int:
        return self.store.drop_namespace(namespace)

    def _plan(self, lines: Sequence[Line], parsed=None) -> tuple[list[PlanLine], list[str], list[str]]:
        """(the script's lines, the distinct canonical codes, each line's code or '')."""
        if parsed is None:
            parsed = codec.parse_many([ln.raw_code for ln in lines], self.profile)
        index: dict[str, int] = {}
        plan, keys = [], []
        for ln, p in zip(lines, parsed):
            key = p[codec.KEY]
            if key:
                u = index.get(key)
                if u is None:
                    u = index[key] = len(index) + 1
                plan.append(PlanLine(u, ln.product_id, ln.units, ""))
            else:
                plan.append(PlanLine(0, ln.product_id, ln.units, p[codec.REASON]))
            keys.append(key)
        return plan, list(index), keys

    # ------------------------------------------------------------------ validation

    def _validate(self, site_id: str, settlement_id: str | None, lines: Sequence[Line],
                  at_ms: int | None = None, at_field: str = "settled_at") -> None:
        validate_settlement(self.rules, site_id, settlement_id, lines, at_ms, at_field)

    def settle_day(self, at_ms: int) -> int:
        """YYYYMMDD of at_ms in the issuer's calendar. The last day's UTC bounds are kept, so a
        settlement of that day costs two comparisons instead of a zone conversion."""
        start, end, day = self._day
        if start <= at_ms < end:
            return day
        day = self._day_of(at_ms)
        bounds = self._day_bounds(at_ms, day)
        if bounds is not None:
            self._day = (*bounds, day)  # one tuple: threads read a consistent triple
        return day

    def _day_of(self, at_ms: int) -> int:
        d = datetime.fromtimestamp(at_ms / 1000, self.tz)
        return d.year * 10000 + d.month * 100 + d.day

    def _day_bounds(self, at_ms: int, day: int) -> tuple[int, int] | None:
        """[start, end) in ms of the local day holding at_ms, when it is a plain 24-hour day
        (the same UTC offset from midnight to midnight); None otherwise (a DST change that
        day): such a day is never cached, each call converts."""
        d = datetime.fromtimestamp(at_ms / 1000, self.tz)
        start = at_ms - ((d.hour * 3600 + d.minute * 60 + d.second) * 1000 + d.microsecond // 1000)
        end = start + 86_400_000
        if (self._day_of(start) == day == self._day_of(end - 1) and self._day_of(start - 1) != day
                and self._day_of(end) != day
                and datetime.fromtimestamp(start / 1000, self.tz).utcoffset()
                == datetime.fromtimestamp((end - 1) / 1000, self.tz).utcoffset()):
            return start, end
        return None

    @staticmethod
    def digest(site_id: str, settlement_id: str, at_ms: int, all_or_nothing: bool,
               lines: Sequence[Line]) -> str:
        """The idempotency digest of a settlement body: BLAKE2b over every field, each written as
        its UTF-8 length (4 bytes) and bytes, so no two bodies share a serialisation whatever
        bytes their fields hold (a raw scan may carry any character; it is then MALFORMED, but
        still part of the body). Prefixed "2." to tell it from the legacy digest."""
        # Compiled (tracecode.codec.wire; its tests hold it byte for byte to this definition):
        # stored settlements are replayed by comparing digests.
        return wire.body_digest(site_id, settlement_id, at_ms, all_or_nothing, lines)

    @staticmethod
    def legacy_digest(site_id: str, settlement_id: str, at_ms: int, all_or_nothing: bool,
                      lines: Sequence[Line]) -> str:
        """The digest records written before "2." carry (fields joined by ASCII 30/31). Used only
        to recognise a retry of such a record; settlement records live settlement_ttl_days (40 by default).
        It is unambiguous for bodies that pass today's validation except through raw codes that
        carry ASCII 30/31, so such a body never matches a legacy record (see dispense)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{site_id}\x1f{settlement_id}\x1f{at_ms}\x1f{int(all_or_nothing)}".encode())
        for ln in lines:
            h.update(f"\x1e{ln.raw_code}\x1f{ln.product_id}\x1f{ln.units}".encode())
        return h.hexdigest()

    def _legacy_replay(self, site_id, settlement_id, at_ms, all_or_nothing, lines) -> SettlementOutcome | None:
        """The stored answer when the settlement id holds a pre-"2." record of this very body."""
        if any("\x1e" in ln.raw_code or "\x1f" in ln.raw_code for ln in lines):
            return None  # the old serialisation cannot tell such a body from another
        stored = self.store.stored_settlement(site_id, settlement_id)
        if not stored or stored[0] != self.legacy_digest(site_id, settlement_id, at_ms, all_or_nothing, lines):
            return None
        _, _, keys = self._plan(lines)
        return self._outcome(stored[1], keys)

    # ------------------------------------------------------------------ operations

    def dispense(self, site_id: str, settlement_id: str, settled_at_ms: int, lines: Sequence[Line],
                 all_or_nothing: bool = False, check_skew: bool = True,
                 insured_id: str = "") -> SettlementOutcome:
        self._validate(site_id, settlement_id, lines)
        insured = self.sanctions.pseudonym(insured_id) if self.sanctions else ""
        digest = self.digest(site_id, settlement_id, settled_at_ms, all_or_nothing, lines)
        if insured:  # another person under a used settlement id is another body
            digest = "2." + hashlib.blake2b(f"{digest}\x1f{insured}".encode(), digest_size=16).hexdigest()
        if check_skew:
            skew = abs(settled_at_ms - now_ms()) / 1000
            if skew > self.rules.clock_skew_s:
                # A late retry of a settlement already recorded still gets its stored answer.
                stored = self.store.stored_settlement(site_id, settlement_id)
                if stored and stored[0] == digest:
                    _, _, keys = self._plan(lines)
                    return self._outcome(stored[1], keys)
                legacy = self._legacy_replay(site_id, settlement_id, settled_at_ms, all_or_nothing, lines)
                if legacy is not None:
                    return legacy
                raise InvalidRequest([("settled_at",
                                       f"{skew:.0f} s from the server clock, at most {self.rules.clock_skew_s} s")])
        plan, codes, keys = self._plan(lines)
        gate = ""
        if self.sanctions:
            gate = self.sanctions.gate_mode(dispense=True)
            if not gate:  # no atomic gate on this backend: the server's view judges first
                replay = self.sanctions.precheck(site_id, settlement_id, insured, digest)
                if replay is not None:
                    return self._outcome(replay, keys)
        try:
            out = self.store.verify(SettlementCall(
                dispense=True, site=site_id, settlement_id=settlement_id, settled_at_ms=settled_at_ms,
                settle_day=self.settle_day(settled_at_ms), digest=digest, all_or_nothing=all_or_nothing,
                lines=plan, codes=codes, insured=insured, gate=gate))
        except Sanctioned as exc:
            if self.sanctions:
                self.sanctions.refused(exc)
            raise
        except SettlementConflict:
            legacy = self._legacy_replay(site_id, settlement_id, settled_at_ms, all_or_nothing, lines)
            if legacy is not None:
                return legacy
            raise SettlementConflict(
                f"settlement {settlement_id!r} of site {site_id!r} was already recorded with a different "
                "request body; use a new settlement id for a new sale") from None
        return self._outcome(out, keys)

    def check(self, site_id: str, at_ms: int | None, lines: Sequence[Line]) -> list[LineOutcome]:
        """The verdicts lines would get now, marking nothing (site_id may be empty)."""
        return self.check_with_sanctions(site_id, at_ms, lines).results

    def check_with_sanctions(self, site_id: str, at_ms: int | None, lines: Sequence[Line],
                             insured_id: str = "") -> CheckOutcome:
        """check(), and the sanctions in force now against the site or the person (judged in the
        same atomic call on one node, from the server's view on a cluster)."""
        at_ms = now_ms() if at_ms is None else at_ms
        self._validate(site_id or "-", None, lines, at_ms, "at")
        insured = self.sanctions.pseudonym(insured_id) if self.sanctions else ""
        plan, codes, keys = self._plan(lines)
        gate = self.sanctions.gate_mode(dispense=False) if self.sanctions else ""
        out = self.store.verify(SettlementCall(
            dispense=False, site=site_id or "", settlement_id="", settled_at_ms=at_ms,
            settle_day=self.settle_day(at_ms), digest="", all_or_nothing=False, lines=plan, codes=codes,
            insured=insured, gate=gate))
        notices: list = []
        if self.sanctions:
            notices = (self.sanctions.notices_of(out.sanctions) if gate else
                       self.sanctions.binding_now(site_id or "", insured))
        return CheckOutcome(self._outcome(out, keys).results, notices)

    def reverse(self, site_id: str, settlement_id: str, line_indexes: Sequence[int], note: str = ""):
        self._validate(site_id, settlement_id, [Line("-", "-")])
        if any(i < 0 for i in line_indexes):
            raise InvalidRequest([("line_indexes", "indexes are 0-based and non-negative")])
        window_ms = int(self.rules.return_window_days * 86_400_000)
        return self.store.reverse(site=site_id, settlement_id=settlement_id, now_ms=now_ms(),
                                  window_ms=window_ms, line_indexes=sorted(set(line_indexes)),
                                  note=note[:200])

    def bulk_prepare(self, settlements, *, replay: bool, state=None, state_ttl_s: int = 0,
                     insured: Sequence = ()) -> "BulkChunk":
        """The Python half of bulk(): parse, validate and plan; no Redis. Split out so a bulk
        stream can prepare the next chunk while Redis works on this one."""
        out: list[SettlementOutcome | str | None] = [None] * len(settlements)
        raws = [ln.raw_code for _, _, _, lines in settlements for ln in lines]
        parsed = codec.parse_many(raws, self.profile)
        calls, where, keys_of = [], [], []
        pos = 0
        for n, (site, sid, at_ms, lines) in enumerate(settlements):
            chunk = parsed[pos:pos + len(lines)]
            pos += len(lines)
            try:
                self._validate(site, sid, lines, at_ms)
                if insured and isinstance(insured[n], InvalidRequest):
                    raise insured[n]
            except InvalidRequest as exc:
                out[n] = str(exc)
                continue
            plan, codes, keys = self._plan(lines, chunk)
            calls.append(SettlementCall(
                dispense=replay, site=site, settlement_id=sid, settled_at_ms=at_ms,
                settle_day=self.settle_day(at_ms), all_or_nothing=False, lines=plan, codes=codes,
                state=state, state_ttl_s=state_ttl_s,
                digest=self.digest(site, sid, at_ms, False, lines) if replay else "",
                insured=insured[n] if insured else ""))
            where.append(n)
            keys_of.append(keys)
        return BulkChunk(out, calls, where, keys_of)

    def bulk_finish(self, prepared: "BulkChunk", results: list) -> list[SettlementOutcome | str]:
        """The other half: the store's answers (verify_batch of prepared.calls) -> outcomes."""
        out = prepared.out
        for n, keys, res, call in zip(prepared.where, prepared.keys_of, results, prepared.calls):
            if isinstance(res, SettlementConflict):
                out[n] = "settlement id already used in this job with different lines"
            else:
                o = out[n] = self._outcome(res, keys)
                o.insured = call.insured
                if self.sanctions:  # judged at the settlement's own time (sanctions kept with history)
                    o.sanctions = self.sanctions.binding_at(call.site, o.insured, call.settled_at_ms)
        return out

    # ------------------------------------------------------------------ results

    def _outcome(self, out: SettlementResult, keys: list[str]) -> SettlementOutcome:
        results = []
        for key, row in zip(keys, out.rows):
            o = LineOutcome(row.verdict, key, row.reason, row.accepted, row.used, row.pack_units, row.status,
                            row.issued_product_id, row.first_site_id, row.first_settlement_id,
                            row.first_settled_at_ms, row.attempts)
            if row.verdict != "MALFORMED":
                o.reason = _REASONS[row.verdict](self, o, row.expiry)
            results.append(o)
        if not out.recorded:
            for o in results:
                if o.verdict == "OK":
                    o.reason = "not recorded: another line of the settlement was flagged (ALL_OR_NOTHING)"
        return SettlementOutcome(results, out.recorded, out.replayed)


def _dup_reason(v: Verifier, o: LineOutcome, _e: int) -> str:
    return (f"already dispensed at site {o.first_site_id} in settlement {o.first_settlement_id} "
            f"at {_fmt_ms(o.first_settled_at_ms, v.tz)}; {o.attempts} flagged attempt(s) since")


# One reason template per verdict (data, not a chain of ifs).
_REASONS = {
    "OK": lambda v, o, e: "",
    "UNKNOWN": lambda v, o, e: "no issuance record for this code",
    "BLOCKED": lambda v, o, e: f"code status is {o.status}",
    "DUPLICATE": _dup_reason,
    "PRODUCT_MISMATCH": lambda v, o, e: f"code was issued for product {o.issued_product_id}, not the billed one",
    "EXPIRED": lambda v, o, e: f"expired on {_fmt_day(e)}",
    "DUPLICATE_IN_REQUEST": lambda v, o, e: "the same pack appears on an earlier line of this settlement",
    "QUANTITY_EXCEEDED": lambda v, o, e: (f"asked more units than remain: {o.units_remaining} of "
                                          f"{o.pack_units} left"),
}
