"""A settlement as the rules see it, before any store: the settings the rules depend on, a line,
the scanner profile, and the validation of a settlement's fields. The server's verifier, the
bulk jobs and the leads engine judge a settlement by these very functions.

Imports: the standard library, the rest of the rules core and the codec (tracecode.codec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tracecode import codec

from .rows import ID_RE, ID_REASON, MAX_PRODUCT_ID
from .text import text_problem

__all__ = ["RulesSettings", "Line", "MIN_TIME_MS", "MAX_TIME_MS", "scan_profile", "settlement_problems"]

# Instants a settlement may carry (1970-01-01 .. 2100-01-01 UTC): a protobuf Timestamp holds far
# more (years 1..9999 and beyond), which the calendar of the expiry check cannot represent.
MIN_TIME_MS, MAX_TIME_MS = 0, 4_102_444_800_000


@dataclass(frozen=True, slots=True)
class RulesSettings:
    """What the rules depend on (docs/verification.md), taken from a configuration by from_config."""
    timezone: str = "Asia/Shanghai"
    clock_skew_s: int = 600
    return_window_days: float = 10.0
    max_lines: int = 200
    max_code_length: int = 512
    max_units: int = 100_000
    cn_prefixes: str = "8"
    gs_substitutes: str = ""
    receipts_required: bool = False  # a sale of a pack no site received carries NOT_RECEIVED

    @classmethod
    def from_config(cls, config: Any) -> "RulesSettings":
        """From any object with these attributes (the server's Config)."""
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})


@dataclass(slots=True)
class Line:
    raw_code: str
    product_id: str
    units: int = 0  # 0 = the whole pack


def scan_profile(rules: RulesSettings) -> "codec.Profile":
    """The scanner profile codes are parsed with under these settings (one for a deployment)."""
    subs = tuple(s for s in rules.gs_substitutes.split(",") if s)
    return codec.Profile(gs_substitutes=subs, cn_prefixes=rules.cn_prefixes, max_length=rules.max_code_length)


def settlement_problems(rules: RulesSettings, site_id: str, settlement_id: str | None, lines: Sequence[Line],
                        at_ms: int | None = None, at_field: str = "settled_at") -> list[tuple[str, str]]:
    """(field, reason) for every field of a settlement that breaks the rules (settlement_id None:
    a call without one, e.g. CheckCodes); [] when it may be judged."""
    bad: list[tuple[str, str]] = []
    if at_ms is not None and not MIN_TIME_MS <= at_ms < MAX_TIME_MS:
        bad.append((at_field, "outside 1970-01-01 .. 2100-01-01 UTC"))
    if not ID_RE.match(site_id or ""):
        bad.append(("site_id", ID_REASON))
    if settlement_id is not None and not ID_RE.match(settlement_id or ""):
        bad.append(("settlement_id", ID_REASON))
    if not lines:
        bad.append(("lines", "at least one line is required"))
    elif len(lines) > rules.max_lines:
        bad.append(("lines", f"{len(lines)} lines, at most {rules.max_lines} per settlement"))
    for i, ln in enumerate(lines[: rules.max_lines]):
        problem = text_problem(ln.product_id, MAX_PRODUCT_ID, "the billed product id")
        if problem:
            bad.append((f"lines[{i}].product_id", problem))
        if len(ln.raw_code) > rules.max_code_length:
            bad.append((f"lines[{i}].raw_code", f"{len(ln.raw_code)} characters, at most {rules.max_code_length}"))
        if ln.units < 0 or ln.units > rules.max_units:
            bad.append((f"lines[{i}].units", f"{ln.units} outside 0..{rules.max_units}"))
    return bad
