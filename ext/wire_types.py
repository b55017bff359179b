"""Shapes shared by the two twins of the wire module (`_wire.pyx`, `wire_fallback.py`).

A results row is the 12 fields of the store's ScriptRow (server/store/types.py), in its order:
verdict, accepted, used, pack_units, status, issued_product_id, expiry, first_site_id,
first_settlement_id, first_settled_at_ms, attempts, reason. The codec is a leaf and cannot
import that type; tests/test_wire.py checks that these positions are ScriptRow's int fields.
"""
from __future__ import annotations

from typing import Any, NamedTuple

ROW_WIDTH = 12
# Positions of the int fields (accepted, used, pack_units, expiry, first_settled_at_ms, attempts).
INT_FIELDS = (1, 2, 3, 6, 9, 10)
# first_site_id, then first_settlement_id and first_settled_at_ms: a stored record writes its
# own first dispense as '=', '', '' (the store's layout 2), decode_results(own=...) restores it.
OWN = 7


class Results(NamedTuple):
    """A decoded verify.lua answer: whether any line was recorded, and one row per line."""
    recorded: bool
    rows: list[Any]
