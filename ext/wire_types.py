"""Shapes shared by the two twins of the wire module (`_wire.pyx`, `wire_fallback.py`), taken from
the rules core's schema (tracecode.rules.schema.ScriptRow), where a results row is defined once:
verdict, accepted, used, pack_units, status, issued_product_id, expiry, first_site_id,
first_settlement_id, first_settled_at_ms, attempts, reason, received_by; and its packed form's
defaults (VERDICT, STATUS, OK_VERDICT, ACTIVE_STATUS: an OK line of an ACTIVE pack is '' twice).

The codec imports nothing of tracecode but that schema (import-linter, pyproject.toml).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from tracecode.rules.schema import ACTIVE_STATUS, OK_VERDICT, OWN, ROW_INT_POSITIONS, ROW_WIDTH, STATUS, VERDICT

__all__ = ["ROW_WIDTH", "INT_FIELDS", "OWN", "VERDICT", "STATUS", "OK_VERDICT", "ACTIVE_STATUS", "Results"]

# Positions of the int fields (accepted, used, pack_units, expiry, first_settled_at_ms, attempts).
INT_FIELDS = ROW_INT_POSITIONS


class Results(NamedTuple):
    """A decoded verify.lua answer: whether any line was recorded, and one row per line."""
    recorded: bool
    rows: list[Any]
