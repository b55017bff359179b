"""The receiving check (入库核验): a delivery's packs judged as stock and the accepted ones recorded
as received by the site, between the Receiving servicer and the store.

A pack may be stock when it was issued, is active, not expired, and no unit of it was ever
settled: one already dispensed offered as stock is a resold pack (回流药), DUPLICATE naming its
first sale. The checks are the settlement's (rules.verdicts.PRECEDENCE, judged in receive.lua);
the reasons here are the receiving clerk's, in Chinese.

May import: the verifier (its codec profile, calendar and validation), the store and the rules
core; never grpc or the generated stubs.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from tracecode.codec import wire
from tracecode.rules.rows import ID_RE
from tracecode.rules.settlement import Line
from tracecode.rules.text import text_problem

from .errors import InvalidRequest, SettlementConflict
from .store import now_ms
from .store.types import ReceiveCall, ReceiveLine, ReceiveRow
from .verifier import Verifier, fmt_day

MAX_SUPPLIER = 100
MAX_DELIVERY_LINES = 5000  # a delivery note's packs in one call; a larger shipment is several notes


@dataclass(frozen=True, slots=True)
class DeliveryLine:
    raw_code: str
    product_id: str = ""


@dataclass(slots=True)
class ReceiveOutcome:
    verdict: str
    canonical_code: str
    reason: str
    status: str = ""
    issued_product_id: str = ""
    first_site_id: str = ""
    first_settled_at_ms: int = 0
    received_before: str = ""  # another site that had received the pack before ('' none)


@dataclass(slots=True)
class DeliveryOutcome:
    results: list[ReceiveOutcome]
    replayed: bool

    @property
    def accepted(self) -> int:
        return sum(1 for r in self.results if r.verdict == "OK")


# The receiving clerk's reason per verdict (data): what to do with the pack, in Chinese.
_REASONS = {
    "OK": lambda v, r: "",
    "UNKNOWN": lambda v, r: "无此追溯码的赋码记录，不应入库：请向供货企业核实",
    "BLOCKED": lambda v, r: f"追溯码状态为 {r.status}（召回、锁定、被盗或销毁），不得入库",
    "DUPLICATE": lambda v, r: (f"该药品已于 {datetime.fromtimestamp(r.first_settled_at_ms / 1000, v.tz):%Y-%m-%d %H:%M} "
                               f"在机构 {r.first_site_id} 医保结算售出，疑似回流药，不得作为库存入库"),
    "PRODUCT_MISMATCH": lambda v, r: f"追溯码赋码药品为 {r.issued_product_id}，与随货同行单所列药品不符",
    "EXPIRED": lambda v, r: f"已于 {fmt_day(r.expiry)} 过期，不得入库",
    "DUPLICATE_IN_REQUEST": lambda v, r: "同一盒药品在本次到货中重复出现",
}


class ReceivingService:
    def __init__(self, verifier: Verifier):
        self.verifier = verifier
        self.store = verifier.store

    def _validate(self, site: str, delivery_id: str, supplier: str, lines: Sequence[DeliveryLine],
                  at_ms: int) -> None:
        bad = []
        for name, value in (("site_id", site), ("delivery_id", delivery_id)):
            if not value:
                bad.append((name, "required"))
            elif not ID_RE.fullmatch(value):
                bad.append((name, "1-64 characters of letters, digits and . _ - only"))
        why = text_problem(supplier, MAX_SUPPLIER, "supplier", required=False)
        if why:
            bad.append(("supplier", why))
        if not lines:
            bad.append(("lines", "required: at least one pack"))
        elif len(lines) > MAX_DELIVERY_LINES:
            bad.append(("lines", f"{len(lines)} lines, at most {MAX_DELIVERY_LINES} per delivery"))
        rules = self.verifier.rules
        for i, ln in enumerate(lines[:MAX_DELIVERY_LINES]):
            if not ln.raw_code:
                bad.append((f"lines[{i}].code", "required"))
            elif len(ln.raw_code) > rules.max_code_length:
                bad.append((f"lines[{i}].code", f"{len(ln.raw_code)} characters, at most {rules.max_code_length}"))
            why = text_problem(ln.product_id, 64, "product id", required=False)
            if why:
                bad.append((f"lines[{i}].product_id", why))
        skew = (at_ms - now_ms()) / 1000
        if skew > rules.clock_skew_s:
            bad.append(("received_at", f"{skew:.0f} s in the future, at most {rules.clock_skew_s} s"))
        if bad:
            raise InvalidRequest(bad)

    @staticmethod
    def digest(site: str, delivery_id: str, supplier: str, at_ms: int, lines: Sequence[DeliveryLine]) -> str:
        """The delivery body's idempotency digest: the settlement digest's construction (every
        field length-prefixed, tracecode.codec.wire.body_digest) over the delivery's fields."""
        return wire.body_digest(site, f"{delivery_id}\x1f{supplier}", at_ms, False,
                                [Line(ln.raw_code, ln.product_id, 0) for ln in lines])

    def receive(self, site: str, delivery_id: str, supplier: str, at_ms: int | None,
                lines: Sequence[DeliveryLine]) -> DeliveryOutcome:
        at_ms = now_ms() if at_ms is None else at_ms
        self._validate(site, delivery_id, supplier, lines, at_ms)
        # The settlement's planning (one codec call, distinct codes indexed); a delivery line has no units.
        plan, codes, keys = self.verifier.plan_lines([Line(ln.raw_code, ln.product_id, 0) for ln in lines])
        try:
            out = self.store.receive(ReceiveCall(
                site=site, delivery_id=delivery_id, supplier=supplier, received_at_ms=at_ms,
                receive_day=self.verifier.settle_day(at_ms), digest=self.digest(site, delivery_id, supplier, at_ms, lines),
                lines=[ReceiveLine(p.code_index, p.product_id, p.malformed_reason) for p in plan], codes=codes))
        except SettlementConflict:
            raise SettlementConflict(f"delivery {delivery_id!r} of site {site!r} was already checked with other "
                                     "lines; a new delivery note needs a new delivery id") from None
        return DeliveryOutcome([self._outcome(key, row, site) for key, row in zip(keys, out.rows)], out.replayed)

    def _outcome(self, key: str, row: ReceiveRow, site: str) -> ReceiveOutcome:
        reason = f"追溯码无法识别：{row.reason}" if row.verdict == "MALFORMED" else _REASONS[row.verdict](self.verifier, row)
        return ReceiveOutcome(row.verdict, key, reason, row.status, row.issued_product_id, row.first_site_id,
                              row.first_settled_at_ms, row.received_before if row.received_before != site else "")
