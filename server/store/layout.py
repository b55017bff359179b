"""The layout of verify.lua's arguments and result rows and of a code's packed state, rendered
into the scripts as Lua tables (store.script_text replaces `--@LAYOUT@--`) from the rules core's
schema (tracecode.rules.schema, where each is written once), so the Python that packs the
arguments, the script that reads them, and the decoder of its answer cannot drift apart.

    ARGV:   VERIFY_ARGV in order, then LINE_FIELDS per line, then the distinct codes, then their
            field names (rules/packing.py code_field).
    a row:  ROW_FIELDS (ScriptRow's fields) in order, then two script-internal slots that are
            removed before the row is stored (the line's code index and the units it asked).

How a code's state is packed into one hash field (keys.py), shared by the Lua that reads and
writes it and the store's readers:

    entry:  ENTRY_FIELDS joined by US (\x1f), trailing empty fields left off. The value of the
            code's field in its bucket hash (the field name is the code packed, rules/packing.py):
            its issuance (lot id, status; '' = ACTIVE) and its dispense state, the first
            dispense's time, site, settlement id and buyer and the receiving site packed,
            attempts 0 as '', a plain first dispense's counters as ev '=' (rules/schema.py).
            A code that was never dispensed
            is just "<lot>" (or "<lot>US<status>").
    lot:    LOT_FIELDS joined by US, in the lot dictionary of the code's hash tag under its lot id
            (a small number in the order the tag met its lots: lua/_state.lua lot_id).
    results: the stored answer of a settlement (field 'r' of its record) and verify.lua's reply:
            "0" or "1" (recorded), then per line RS (\x1e) and ROW_FIELDS joined by US, the
            common values as nothing (rules/schema.py: ints 0, OK of an ACTIVE pack, trailing
            empty fields). Ids and
            free text never hold control characters (rules/text.py refuses them), so the separators
            cannot occur inside a value.
    ledger: a settlement's lines for returns (field 'l' of its record): per line RS, then its
            code packed (rules/packing.py; '' for a malformed line), units taken, units returned
            and line index joined by US, 0 as '', the index '' when it is the line's position in
            the ledger, trailing empty fields left off (_state.lua ledger_text, store.py
            ledger_entries).
"""
from __future__ import annotations

from tracecode.rules.schema import (ACTIVE_STATUS, ENTRY_FIELDS, LINE_FIELDS, LOT_FIELDS, OK_VERDICT, RECEIVE_ARGV,
                                    RECEIVE_LINE_FIELDS, ROW_FIELDS, ROW_INT_POSITIONS, ROW_INTERNAL, RS, STATUS, US,
                                    VERDICT, VERIFY_ARGV)

__all__ = ["VERIFY_ARGV", "LINE_FIELDS", "ROW_INTERNAL", "ENTRY_FIELDS", "LOT_FIELDS", "US", "RS", "lua_layout",
           "lua_row_text"]


def _table(name: str, fields, base: int) -> str:
    return f"local {name} = {{" + ", ".join(f"{f} = {i + base}" for i, f in enumerate(fields)) + "}"


def lua_layout() -> str:
    """The Lua text spliced at --@LAYOUT@--: A (ARGV positions), L (offsets within a line),
    R (positions within a result row), E (an entry's fields), LT (a lot's fields), LINE0, STRIDE,
    NENTRY and NROW; for receive.lua RA (its ARGV positions), RL (offsets within a line), NRA and
    RSTRIDE."""
    return "\n".join([
        "-- Generated from tracecode.rules.schema by tracecode.server.store.layout (do not edit here).",
        _table("A", VERIFY_ARGV, 1),
        _table("L", LINE_FIELDS, 0),
        _table("R", ROW_FIELDS + ROW_INTERNAL, 1),
        _table("E", ENTRY_FIELDS, 1),
        _table("LT", LOT_FIELDS, 1),
        f"local NENTRY, NROW = {len(ENTRY_FIELDS)}, {len(ROW_FIELDS)}",
        f"local LINE0, STRIDE = {len(VERIFY_ARGV) + 1}, {len(LINE_FIELDS)}",
        _table("RA", RECEIVE_ARGV, 1),
        _table("RL", RECEIVE_LINE_FIELDS, 0),
        f"local NRA, RSTRIDE = {len(RECEIVE_ARGV)}, {len(RECEIVE_LINE_FIELDS)}",
        # A row from named fields, in ROW_FIELDS order (no loop: one table constructor).
        "local function make_row(t) return {"
        + ", ".join(f"t.{f}" for f in ROW_FIELDS + ROW_INTERNAL) + "} end",
        # Tables of a known size are made by one constructor: Lua 5.1 grows a table built field by
        # field through every power of two, and that growth measured as the costliest part of
        # packing and unpacking (callgrind, benchmarks/memory.py's settlements).
        f"local function new_entry() return {{{', '.join(['false'] * len(ENTRY_FIELDS))}}} end",
        f"local function new_lot() return {{{', '.join(['false'] * len(LOT_FIELDS))}}} end",
    ])


def lua_row_text() -> str:
    """The Lua function that packs one result row (rules/schema.py: ints 0 as '', OK of an ACTIVE
    pack as '' twice, trailing empty fields left off): one concatenation, then the trailing
    separators cut."""
    parts = [f"zstr(r[{i + 1}])" if i in ROW_INT_POSITIONS else f"r[{i + 1}]" for i in range(len(ROW_FIELDS))]
    parts[VERDICT], parts[STATUS] = "v", "s"
    return "\n".join([
        "local function row_text(r)",
        f"  local v, s = r[{VERDICT + 1}], r[{STATUS + 1}]",
        f"  if v == '{OK_VERDICT}' and s == '{ACTIVE_STATUS}' then v, s = '', '' end",
        "  local t = " + " .. US .. ".join(parts),
        # One search in C for the run of trailing separators (a field never holds one).
        "  local cut = string.find(t, '\\031+$')",
        "  if cut then return string.sub(t, 1, cut - 1) end",
        "  return t",
        "end",
    ])
