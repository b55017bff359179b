"""The verifier: the rules of docs/verification.md between the servicer and the store.

It validates a settlement, canonicalises every scan with the codec (one batch call), hands the
distinct codes to the store for one atomic judge-and-mark (a `SettlementCall`), and turns the
store's decoded rows into verdicts with reasons a pharmacist can act on.

May import: the codec, the plain modules (errors, verdicts) and the store; never grpc or the
generated stubs. It is given the rule settings it needs (`RulesSettings`), not the whole Config.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, Sequence
from zoneinfo import ZoneInfo

from tracecode import codec
from tracecode.codec import wire
from tracecode.rules import live as live_rules
from tracecode.rules.rows import ID_RE  # noqa: F401 - the id rule the server's other modules name
from tracecode.rules.settlement import Line, RulesSettings, scan_profile, settlement_problems
from tracecode.rules.text import text_problem

from .config import Config
from .errors import InvalidRequest, LiveRuleRefused, Sanctioned, SettlementConflict
from .store import Store, now_ms
from .store.types import CodeHistory, PlanLine, SettlementCall, SettlementResult

if TYPE_CHECKING:  # the service holds the verifier's collaborators, not the reverse
    from .sanction_service import SanctionService

log = logging.getLogger("tracecode.verifier")

# Site and settlement ids end up in keys, logs and reports: a conservative alphabet.
_ID = ID_RE
# Free-text fields (product ids, batches, manufacturers): the rules core's one rule (no control,
# format or bidirectional-override character), re-exported for issuance.py.
MAX_NOTE = 200  # a return's reason


class Plan(NamedTuple):
    """A settlement's lines as the store takes them (Verifier.plan_lines)."""
    lines: list[PlanLine]  # one per request line
    codes: list[str]  # the distinct canonical codes, in PlanLine.code_index order
    keys: list[str]  # each request line's canonical code ('' for a malformed scan)


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
    receipt: str = ""  # RECEIVED_ELSEWHERE, NOT_RECEIVED or '' (RECEIPT_TEXT)
    reason_zh: str = ""  # the reason as the pharmacist reads it (REASONS_ZH)

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
class LiveNotice:
    """A live rule that holds for the settlement's insured person (rules/live.py): its figures
    and the pharmacist's text. action NOTICE (the default), or UNJUDGED when the rule could not
    be judged this time (a cluster's second call failed; the settlement stands)."""
    model: str
    version: int
    action: str
    text: str
    packs: int = 0
    sites: int = 0
    product_id: str = ""
    window_hours: float = 0.0


@dataclass(slots=True)
class SettlementOutcome:
    results: list[LineOutcome]
    recorded: bool
    replayed: bool
    notices: list = field(default_factory=list)  # LiveNotice, live dispenses only
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


def fmt_day(day: int) -> str:
    """YYYYMMDD as YYYY-MM-DD (the receiving check's reasons use it too)."""
    s = str(day)
    return f"{s[:4]}-{s[4:6]}-{s[6:]}" if len(s) == 8 else s


def validate_settlement(rules: RulesSettings, site_id: str, settlement_id: str | None, lines: Sequence[Line],
                        at_ms: int | None = None, at_field: str = "settled_at") -> None:
    """InvalidRequest naming every field of a settlement that breaks the rules core's
    (rules/settlement.py settlement_problems, which the leads engine applies too)."""
    bad = settlement_problems(rules, site_id, settlement_id, lines, at_ms, at_field)
    if bad:
        raise InvalidRequest(bad)


class Verifier:
    def __init__(self, store: Store, rules: RulesSettings | Config, live: live_rules.LiveRules | None = None):
        self.store = store
        # The live rules (rules/live.py) judged at each live dispense; None or inactive: none.
        self.live = live if live is not None and live.active else None
        self._live_arg = self.live.lua_arg(store.keys.prefix, "C" if store.cluster else "J") if self.live else ""
        if not isinstance(rules, RulesSettings):
            rules = RulesSettings.from_config(rules)
        self.rules = rules
        self.tz = ZoneInfo(rules.timezone)
        self.profile = scan_profile(rules)
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

    def plan_lines(self, lines: Sequence[Line], parsed=None) -> "Plan":
        """The script's lines, the distinct canonical codes, each line's code or '' (one batch call
        to the codec; `parsed` when the caller parsed the scans already)."""
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
        return Plan(plan, list(index), keys)

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
        still part of the body). Prefixed "2.", the digest's version: the data-set marker
        (store/marker.py) guards the stored records' format, a new version its migration."""
        # Compiled (tracecode.codec.wire; its tests hold it byte for byte to this definition):
        # stored settlements are replayed by comparing digests.
        return wire.body_digest(site_id, settlement_id, at_ms, all_or_nothing, lines)

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
                if stored and stored.digest == digest:
                    _, _, keys = self.plan_lines(lines)
                    return self._outcome(stored.result, keys, site_id)
                raise InvalidRequest([("settled_at",
                                       f"{skew:.0f} s from the server clock, at most {self.rules.clock_skew_s} s")])
        plan, codes, keys = self.plan_lines(lines)
        gate = ""
        if self.sanctions:
            gate = self.sanctions.gate_mode(dispense=True)
            if not gate:  # no atomic gate on this backend: the server's view judges first
                replay = self.sanctions.precheck(site_id, settlement_id, insured, digest)
                if replay is not None:
                    return self._outcome(replay, keys, site_id)
        call = SettlementCall(
            dispense=True, site=site_id, settlement_id=settlement_id, settled_at_ms=settled_at_ms,
            settle_day=self.settle_day(settled_at_ms), digest=digest, all_or_nothing=all_or_nothing,
            lines=plan, codes=codes, insured=insured, gate=gate, live=self._live_arg)
        try:
            if self.live and self.store.cluster and insured and self.live.refusing:
                # A cluster judges the person in their own slot: a rule that refuses is asked
                # before anything is marked, with every line's pack as if it were recorded.
                self._live_precheck(call, lines, keys)
            out = self.store.verify(call)
        except Sanctioned as exc:
            if self.sanctions:
                self.sanctions.refused(exc)
            raise
        except LiveRuleRefused as exc:
            n = exc.notice
            exc.text = live_rules.notice_text(n["m"], self._figures(n), int(n.get("v", 0)), refused=True)
            raise
        except SettlementConflict:
            raise SettlementConflict(
                f"settlement {settlement_id!r} of site {site_id!r} was already recorded with a different "
                "request body; use a new settlement id for a new sale") from None
        outcome = self._outcome(out, keys, site_id)
        if self.live and out.live is not None and not out.replayed:
            outcome.notices = self._live_notices(call, out, keys)
        return outcome

    # ------------------------------------------------------------------ live rules

    @staticmethod
    def _figures(n: dict) -> dict:
        return {"packs": int(n.get("k", 0)), "sites": int(n.get("s", 0)), "product_id": n.get("g", ""),
                "window_days": float(n.get("w", 0)) / 24}

    def _notice(self, n: dict) -> LiveNotice:
        version = int(n.get("v", 0))
        return LiveNotice(n["m"], version, "REFUSE" if n.get("a") == "R" else "NOTICE",
                          live_rules.notice_text(n["m"], self._figures(n), version), int(n.get("k", 0)),
                          int(n.get("s", 0)), n.get("g", ""), float(n.get("w", 0)))

    def _live_precheck(self, call: SettlementCall, lines: Sequence[Line], keys: list[str]) -> None:
        """Cluster, a rule set to refuse: judge the person before the settlement (live.lua 'D').
        LiveRuleRefused when a rule refuses; a failure of this call refuses nothing (the rule is
        then judged after the settlement, or reported unjudged)."""
        packs = [(ln.product_id, key) for ln, key in zip(lines, keys) if key]
        try:
            self.store.live_rules(self._live_arg, "D", call.insured, call, packs, [])
        except LiveRuleRefused:
            raise
        except Exception:  # noqa: BLE001 - judged after the settlement instead (or reported unjudged)
            log.warning("live rules: refusal check failed for settlement %s", call.settlement_id, exc_info=True)

    def _live_notices(self, call: SettlementCall, out: SettlementResult, keys: list[str]) -> list[LiveNotice]:
        """The notices of a live dispense: judged in its own call (one node), or in the person's
        slot now (a cluster: one more round trip, whose failure the answer reports as UNJUDGED
        without failing the settlement)."""
        assert self.live is not None and out.live is not None
        if "n" in out.live:
            return [self._notice(n) for n in out.live["n"] or []]
        packs = [(row.issued_product_id, key) for row, key in zip(out.rows, keys)
                 if out.recorded and row.verdict == "OK" and row.accepted > 0]
        credits = [(fp, code) for fp, code in out.live.get("c") or []]
        if not call.insured and not credits:
            return []
        try:
            return [self._notice(n) for n in self.store.live_rules(self._live_arg, "J", call.insured, call,
                                                                     packs, credits)]
        except Exception:  # noqa: BLE001 - whatever failed, the settlement is recorded and answered
            log.warning("live rules not judged for settlement %s of site %s", call.settlement_id, call.site,
                        exc_info=True)
            return [LiveNotice(r.model, r.version, "UNJUDGED", live_rules.UNJUDGED_TEXT.format(model=r.model),
                               window_hours=r.window_hours)
                    for r in self.live.rules.values() if r.action != "OFF"]

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
        plan, codes, keys = self.plan_lines(lines)
        gate = self.sanctions.gate_mode(dispense=False) if self.sanctions else ""
        out = self.store.verify(SettlementCall(
            dispense=False, site=site_id or "", settlement_id="", settled_at_ms=at_ms,
            settle_day=self.settle_day(at_ms), digest="", all_or_nothing=False, lines=plan, codes=codes,
            insured=insured, gate=gate))
        notices: list = []
        if self.sanctions:
            notices = (self.sanctions.notices_of(out.sanctions) if gate else
                       self.sanctions.binding_now(site_id or "", insured))
        return CheckOutcome(self._outcome(out, keys, site_id or "").results, notices)

    def reverse(self, site_id: str, settlement_id: str, line_indexes: Sequence[int], note: str = ""):
        self._validate(site_id, settlement_id, [Line("-", "-")])
        if any(i < 0 for i in line_indexes):
            raise InvalidRequest([("line_indexes", "indexes are 0-based and non-negative")])
        problem = text_problem(note, MAX_NOTE, "reason", required=False)
        if problem:
            raise InvalidRequest([("reason", problem)])
        window_ms = int(self.rules.return_window_days * 86_400_000)
        return self.store.reverse(site=site_id, settlement_id=settlement_id, now_ms=now_ms(),
                                  window_ms=window_ms, line_indexes=sorted(set(line_indexes)),
                                  note=note)

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
            plan, codes, keys = self.plan_lines(lines, chunk)
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

    def receipt_notice(self, received_by: str, site: str) -> str:
        """The receipt notice of a pack sold at `site` (入库核验): received by another site, or by
        none where the deployment requires receipts; '' otherwise."""
        if received_by:
            return "RECEIVED_ELSEWHERE" if received_by != site else ""
        return "NOT_RECEIVED" if self.rules.receipts_required else ""

    def _outcome(self, out: SettlementResult, keys: list[str], site: str = "") -> SettlementOutcome:
        """`site`: the selling site, for the receipt notice of OK lines ('' none: bulk jobs)."""
        results = []
        for key, row in zip(keys, out.rows):
            o = LineOutcome(row.verdict, key, row.reason, row.accepted, row.used, row.pack_units, row.status,
                            row.issued_product_id, row.first_site_id, row.first_settlement_id,
                            row.first_settled_at_ms, row.attempts)
            if row.verdict != "MALFORMED":
                o.reason = _REASONS[row.verdict](self, o, row.expiry)
                o.reason_zh = REASONS_ZH[row.verdict](self, o, row.expiry)
            else:
                o.reason_zh = f"追溯码无法识别：{row.reason}"  # the codec's own reason, as the scan failed
            if site and row.verdict == "OK":
                o.receipt = self.receipt_notice(row.received_by, site)
            results.append(o)
        if not out.recorded:
            for o in results:
                if o.verdict == "OK":
                    o.reason = "not recorded: another line of the settlement was flagged (ALL_OR_NOTHING)"
                    o.reason_zh = "未记录：本次结算另有明细被标记（整单要么全部记录要么全不记录）"
        return SettlementOutcome(results, out.recorded, out.replayed)


def _dup_reason(v: Verifier, o: LineOutcome, _e: int) -> str:
    # Site and time only: the reason goes to whichever pharmacy asks, and another pharmacy's
    # settlement id is not theirs to see (the evidence field carries it to the first site and to
    # admins; api/convert.py).
    return (f"already dispensed at site {o.first_site_id} at {_fmt_ms(o.first_settled_at_ms, v.tz)}; "
            f"{o.attempts} flagged attempt(s) since")


def _dup_reason_zh(v: Verifier, o: LineOutcome, _e: int) -> str:
    t = datetime.fromtimestamp(o.first_settled_at_ms / 1000, v.tz)
    return (f"该药品已于 {t:%Y-%m-%d %H:%M} 在机构 {o.first_site_id} 医保结算售出（疑似回流药/重复结算），"
            f"此后已被标记 {o.attempts} 次，不得再次结算")


# The pharmacist's reason per verdict (LineResult.reason_zh; `reason` stays English for logs and
# tools): the same facts as _REASONS, in Chinese.
REASONS_ZH = {
    "OK": lambda v, o, e: "",
    "UNKNOWN": lambda v, o, e: "无此追溯码的赋码记录，请核实药品来源",
    "BLOCKED": lambda v, o, e: f"追溯码状态为 {o.status}（召回、锁定、被盗或销毁），不得结算",
    "DUPLICATE": _dup_reason_zh,
    "PRODUCT_MISMATCH": lambda v, o, e: f"追溯码赋码药品为 {o.issued_product_id}，与结算药品不符（疑似串换）",
    "EXPIRED": lambda v, o, e: f"已于 {fmt_day(e)} 过期",
    "DUPLICATE_IN_REQUEST": lambda v, o, e: "同一盒药品已在本次结算的前面明细中出现",
    "QUANTITY_EXCEEDED": lambda v, o, e: f"拆零数量超过剩余：本盒共 {o.pack_units}，剩余 {o.units_remaining}",
}

# The receipt notices as the pharmacist reads them (LineResult.receipt_text).
RECEIPT_TEXT = {
    "RECEIVED_ELSEWHERE": "该药品由其他机构入库核验（来源不明/串货），请核实进货来源",
    "NOT_RECEIVED": "该药品无入库核验记录（无随货同行单），请核实进货来源",
}

# One reason template per verdict (data, not a chain of ifs).
_REASONS = {
    "OK": lambda v, o, e: "",
    "UNKNOWN": lambda v, o, e: "no issuance record for this code",
    "BLOCKED": lambda v, o, e: f"code status is {o.status}",
    "DUPLICATE": _dup_reason,
    "PRODUCT_MISMATCH": lambda v, o, e: f"code was issued for product {o.issued_product_id}, not the billed one",
    "EXPIRED": lambda v, o, e: f"expired on {fmt_day(e)}",
    "DUPLICATE_IN_REQUEST": lambda v, o, e: "the same pack appears on an earlier line of this settlement",
    "QUANTITY_EXCEEDED": lambda v, o, e: (f"asked more units than remain: {o.units_remaining} of "
                                          f"{o.pack_units} left"),
}
