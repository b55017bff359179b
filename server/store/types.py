"""The typed seam between the store and the code above it: what a settlement call carries in, and
what the store decodes a script's reply and a code's keys into. Plain data, no Redis.

`ScriptRow`, a row of verify.lua's results (the stored answer of a settlement, replayed byte for
byte), is the rules core's (tracecode.rules.schema): written once there, rendered into the
scripts by layout.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from tracecode.codec import wire
from tracecode.rules.schema import ROW_FIELDS, ROW_INT_POSITIONS, ScriptRow

from .keys import KeySpace

__all__ = ["PlanLine", "SettlementCall", "ScriptRow", "ROW_FIELDS", "ROW_INT_POSITIONS", "SettlementResult",
           "StoredSettlement", "Reversal", "IssuanceRecord", "CodeEvent", "CodeHistory", "decode_stored",
           "ReceiveLine", "ReceiveCall", "ReceiveRow", "ReceiveResult"]


class PlanLine(NamedTuple):
    """One line as verify.lua takes it: the index of its code among the call's distinct codes
    (1-based; 0 for a malformed scan), the billed product, the units (0 = the whole pack) and,
    for a malformed scan, why."""
    code_index: int
    product_id: str
    units: int
    malformed_reason: str


@dataclass(slots=True)
class SettlementCall:
    """One settlement for Store.verify / verify_batch. `state`: a bulk REPLAY job's namespace
    (dispense state, settlement records, no events) instead of the live one."""
    dispense: bool  # False: judge only (CheckCodes, bulk CHECK), marking nothing
    site: str
    settlement_id: str
    settled_at_ms: int
    settle_day: int  # YYYYMMDD in the issuer's calendar, for the expiry check
    digest: str  # idempotency digest of the body ('' when not dispensing)
    all_or_nothing: bool
    lines: Sequence[PlanLine]
    codes: Sequence[str]  # the distinct canonical codes, in code_index order
    state: KeySpace | None = None
    state_ttl_s: int = 0
    insured: str = ""  # the insured pseudonym ('' when none): kept with the first dispense
    gate: str = ""  # lua/gate.lua's mode: 'E' enforce sanctions, 'N' report them, '' neither
    # The live rules' configuration argument (rules.live.LiveRules.lua_arg; '' off): judged in
    # the call on one node, the first buyers of its DUPLICATEs collected on a cluster.
    live: str = ""


class ReceiveLine(NamedTuple):
    """One delivery line as receive.lua takes it: the code's index among the call's distinct codes
    (1-based; 0 for a malformed scan), the product the delivery names ('' none), why malformed."""
    code_index: int
    product_id: str
    malformed_reason: str


@dataclass(slots=True)
class ReceiveCall:
    """One delivery for Store.receive: the receiving check (入库核验) of its packs."""
    site: str
    delivery_id: str
    supplier: str
    received_at_ms: int
    receive_day: int  # YYYYMMDD in the issuer's calendar, for the expiry check
    digest: str  # idempotency digest of the delivery's lines
    lines: Sequence[ReceiveLine]
    codes: Sequence[str]  # the distinct canonical codes, in code_index order


class ReceiveRow(NamedTuple):
    """One line's answer (receive.lua's fields, in its order)."""
    verdict: str
    status: str
    issued_product_id: str
    expiry: int
    first_site_id: str  # DUPLICATE: the pack's first dispense
    first_settled_at_ms: int
    received_before: str  # the site that had received the pack before ('' none; may be this one)
    reason: str  # MALFORMED: why


@dataclass(slots=True)
class ReceiveResult:
    replayed: bool
    rows: list[ReceiveRow]


@dataclass(slots=True)
class SettlementResult:
    """A settlement as the store judged it: one row per request line, in order."""
    replayed: bool  # the stored answer of an earlier identical call, nothing written now
    recorded: bool  # at least one line was recorded
    rows: list[ScriptRow]
    sanctions: list[str] = field(default_factory=list)  # gate 'N': binding entries (json), gate.lua
    # The live rules' answer (gate.lua): {"n": notices} judged in the call (one node), or
    # {"c": [[first buyer, code], ...]} to judge in a second call (a cluster); None: not judged.
    live: dict | None = None


class StoredSettlement(NamedTuple):
    """A recorded settlement as Store.stored_settlement reads it: the digest of its body and its
    stored answer, as a replay would give it."""
    digest: str
    result: SettlementResult


@dataclass(slots=True)
class Reversal:
    """One line of a return as Store.reverse answers it."""
    line_index: int
    canonical_code: str
    units_returned: int  # units this line gave back (now or by an earlier call)
    units_used: int  # the pack's units used after the call
    already_reversed: bool  # the line had been returned before this call


@dataclass(slots=True)
class IssuanceRecord:
    product_id: str
    gtin: str = ""
    batch: str = ""
    expiry: int = 0  # YYYYMMDD, 0 when unknown
    pack_units: int = 1
    manufacturer: str = ""
    status: str = "ACTIVE"


@dataclass(slots=True)
class CodeEvent:
    type: str  # one of verdicts.EVENTS
    at_ms: int
    site_id: str
    settlement_id: str
    line_index: int
    units: int
    detail: str
    insured_id: str = ""  # the settlement's insured pseudonym


@dataclass(slots=True)
class CodeHistory:
    """A code's issuance record (None: never issued), dispense state and kept events."""
    record: IssuanceRecord | None
    units_used: int = 0
    first_site_id: str = ""
    first_settlement_id: str = ""
    first_settled_at_ms: int = 0
    attempts: int = 0
    events_total: int = 0
    events: list[CodeEvent] = field(default_factory=list)
    first_insured_id: str = ""  # the first buyer's insured pseudonym


def decode_stored(text: str, site: str, settlement_id: str, at_ms: int) -> tuple[bool, list[ScriptRow]]:
    """A settlement's results as verify.lua and commit.lua answer and store them (packed,
    rules/schema.py): (recorded, rows). A first dispense that is the settlement's own is written
    '=', '', '', and the settlement's site, id and time complete it. Decoded by the compiled
    wire module (tests/test_wire.py holds it to this)."""
    return wire.decode_results(text, ScriptRow, (site, settlement_id, at_ms))
