"""The typed seam between the store and the code above it: what a settlement call carries in, and
what the store decodes a script's reply and a code's keys into. Plain data, no Redis.

The field order of `ScriptRow` is the order of a row in verify.lua's results JSON (the stored
answer of a settlement, replayed byte for byte); `ROW_FIELDS` is spliced into the script, so
the layout is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence, get_type_hints

from .keys import KeySpace


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


class ScriptRow(NamedTuple):
    """One line's result as verify.lua reports it (a row of its results JSON, in this order).
    `used`, the first_* fields and `attempts` describe the pack after the whole settlement."""
    verdict: str
    accepted: int
    used: int
    pack_units: int
    status: str
    issued_product_id: str
    expiry: int  # YYYYMMDD, 0 when none
    first_site_id: str
    first_settlement_id: str
    first_settled_at_ms: int
    attempts: int
    reason: str  # set by the script only for MALFORMED


ROW_FIELDS = ScriptRow._fields
# The positions of the int fields of a row (the packed results hold text: layout.py).
ROW_INT_POSITIONS = tuple(i for i, t in enumerate(get_type_hints(ScriptRow).values()) if t is int)


@dataclass(slots=True)
class SettlementResult:
    """A settlement as the store judged it: one row per request line, in order."""
    replayed: bool  # the stored answer of an earlier identical call, nothing written now
    recorded: bool  # at least one line was recorded
    rows: list[ScriptRow]
    sanctions: list[str] = field(default_factory=list)  # gate 'N': binding entries (json), gate.lua


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
