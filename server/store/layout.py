"""The layout of verify.lua's arguments and result rows, written once, here, and spliced into the
scripts as Lua tables (store.script_text replaces `--@LAYOUT@--`), so the Python that packs the
arguments, the script that reads them, and the decoder of its answer cannot drift apart.

    ARGV:   VERIFY_ARGV in order, then LINE_FIELDS per line, then the distinct codes.
    a row:  ROW_FIELDS (ScriptRow's fields) in order, then two script-internal slots that are
            removed before the row is stored (the line's code index and the units it asked).

Layout 2 (keys.py) also keeps here how a code's state is packed into one hash field, so the Lua
that reads and writes it, the migration from layout 1 and the store's readers share one table:

    entry:  ENTRY_FIELDS joined by US (\x1f), trailing empty fields left off. The value of field
            <code> in the code's bucket hash: its issuance (lot id, status; '' = ACTIVE) and its
            dispense state. A code that was never dispensed is just "<lot>" (or "<lot>US<status>").
    lot:    LOT_FIELDS joined by US, in the lot dictionary of the code's hash tag under its lot id
            (the first 12 hex digits of its SHA-1, probed on a collision: lua/_state.lua).
    results: the stored answer of a settlement (field 'r' of its record) and verify.lua's reply:
            "0" or "1" (recorded), then per line RS (\x1e) and ROW_FIELDS joined by US. Ids and
            free text never hold control characters (verifier.py refuses them), so the separators
            cannot occur inside a value. A text starting with '{' is layout 1's JSON form (records
            stored before the migration), read the same way.
"""
from __future__ import annotations

from .types import ROW_FIELDS

# verify.lua's fixed arguments, in ARGV order (1-based in Lua).
VERIFY_ARGV = (
    "mode",              # 'D' dispense, 'C' check only, 'P' prepare (cluster two-phase)
    "site",
    "settlement_id",
    "settled_at_ms",
    "settle_day",        # YYYYMMDD in the issuer's calendar
    "digest",            # idempotency digest of the body
    "policy",            # 'R' record accepted, 'A' all or nothing
    "audit_max",         # audit stream max length; 0 writes no events (a job namespace)
    "history_max",       # events kept per code
    "settlement_ttl_s",  # settlement record lifetime
    "n_lines",
    "state_ttl",         # dispense state ttl, s (0 none); in mode 'P' the reservation's life, ms
    "reserved",          # unused (the caller's clock once; reservations use the node's TIME)
)
# Per line, after the fixed arguments (offsets from the line's first argument).
LINE_FIELDS = ("code_index", "product_id", "units", "malformed_reason", "line_index")
# The script-internal slots after a row's ROW_FIELDS.
ROW_INTERNAL = ("code_index", "want")


# Layout 2: one code's value in its bucket hash (see the module docstring), 1-based in Lua (E).
ENTRY_FIELDS = (
    "lot",     # lot id in the tag's lot dictionary ('' in a bulk job's namespace: state only)
    "status",  # '' = ACTIVE, else the status text (LOCKED, RECALLED, ...)
    "u",       # units used
    "fs",      # first dispense of the current use cycle: site, settlement id, settled_at ms
    "fi",
    "fa",
    "at",      # duplicate attempts against that first dispense
    "fp",      # the first buyer's insured pseudonym
    "ev",      # events ever logged for the code (kept or not)
    "fd",      # position of the first-ever DISPENSED event among the kept events ('' none yet)
    "fl",      # that event's line index and units, while it is implicit (fx = '')
    "fu",
    "fx",      # '1': the first-ever DISPENSED event was written out into the history list
    "rv",      # cluster two-phase reservations, json (verify.lua 'P')
)
LOT_FIELDS = ("product_id", "gtin", "batch", "expiry", "pack_units", "manufacturer")
US, RS = "\x1f", "\x1e"


def _table(name: str, fields, base: int) -> str:
    return f"local {name} = {{" + ", ".join(f"{f} = {i + base}" for i, f in enumerate(fields)) + "}"


def lua_layout() -> str:
    """The Lua text spliced at --@LAYOUT@--: A (ARGV positions), L (offsets within a line),
    R (positions within a result row), E (an entry's fields), LT (a lot's fields), LINE0, STRIDE,
    NENTRY and NROW."""
    return "\n".join([
        "-- Generated from tracecode.server.store.layout (do not edit here).",
        _table("A", VERIFY_ARGV, 1),
        _table("L", LINE_FIELDS, 0),
        _table("R", ROW_FIELDS + ROW_INTERNAL, 1),
        _table("E", ENTRY_FIELDS, 1),
        _table("LT", LOT_FIELDS, 1),
        f"local NENTRY, NROW = {len(ENTRY_FIELDS)}, {len(ROW_FIELDS)}",
        f"local LINE0, STRIDE = {len(VERIFY_ARGV) + 1}, {len(LINE_FIELDS)}",
        # A row from named fields, in ROW_FIELDS order (no loop: one table constructor).
        "local function make_row(t) return {"
        + ", ".join(f"t.{f}" for f in ROW_FIELDS + ROW_INTERNAL) + "} end",
    ])
