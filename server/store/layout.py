"""The layout of verify.lua's arguments and result rows, written once, here, and spliced into the
scripts as Lua tables (store.script_text replaces `--@LAYOUT@--`), so the Python that packs the
arguments, the script that reads them, and the decoder of its answer cannot drift apart.

    ARGV:   VERIFY_ARGV in order, then LINE_FIELDS per line, then the distinct codes.
    a row:  ROW_FIELDS (ScriptRow's fields) in order, then two script-internal slots that are
            removed before the row is stored (the line's code index and the units it asked).
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


def _table(name: str, fields, base: int) -> str:
    return f"local {name} = {{" + ", ".join(f"{f} = {i + base}" for i, f in enumerate(fields)) + "}"


def lua_layout() -> str:
    """The Lua text spliced at --@LAYOUT@--: A (ARGV positions), L (offsets within a line),
    R (positions within a result row), LINE0 and STRIDE."""
    return "\n".join([
        "-- Generated from tracecode.server.store.layout (do not edit here).",
        _table("A", VERIFY_ARGV, 1),
        _table("L", LINE_FIELDS, 0),
        _table("R", ROW_FIELDS + ROW_INTERNAL, 1),
        f"local LINE0, STRIDE = {len(VERIFY_ARGV) + 1}, {len(LINE_FIELDS)}",
        # A row from named fields, in ROW_FIELDS order (no loop: one table constructor).
        "local function make_row(t) return {"
        + ", ".join(f"t.{f}" for f in ROW_FIELDS + ROW_INTERNAL) + "} end",
    ])
