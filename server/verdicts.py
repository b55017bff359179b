"""Verdicts, their precedence, issuance statuses and event types, as strings: data the verifier,
the store's Lua scripts and the API share (the API maps the names to its enums).

The Lua script receives PRECEDENCE at load time (it is spliced into the script text), so the
order in which checks win lives in exactly one place: here.

May import: nothing (plain data).
"""

# When several checks fail for one line, the first in this list is the verdict.
# A resold pack is the stronger signal than a product mismatch, hence DUPLICATE before it.
PRECEDENCE = (
    "MALFORMED",
    "DUPLICATE_IN_REQUEST",
    "UNKNOWN",
    "BLOCKED",
    "DUPLICATE",
    "PRODUCT_MISMATCH",
    "EXPIRED",
    "QUANTITY_EXCEEDED",
)

VERDICTS = ("OK",) + PRECEDENCE

# Issuance statuses; every status but ACTIVE blocks dispensing.
STATUSES = ("ACTIVE", "RECALLED", "LOCKED", "STOLEN", "DESTROYED")

# Event types as the scripts write them in a code's history and the audit stream.
EVENTS = ("DISPENSED", "ATTEMPT", "REVERSED", "STATUS_CHANGED")


def lua_precedence() -> str:
    """PRECEDENCE as a Lua table body (MALFORMED is decided before Redis, so it is left out)."""
    return ", ".join(f"'{v}'" for v in PRECEDENCE if v != "MALFORMED")
