"""Verdicts, their precedence, issuance statuses and event types, as strings: data the verifier,
the store's Lua scripts and the API share (the API maps the names to its enums).

The order in which checks win lives in exactly one place, here, and is rendered where it runs:
spliced into verify.lua at load time (lua_precedence), generated into the leads engine's verdict
CASE (leads/sql.py verdict_case) and walked by its split-pack pass (leads/splitpack.py).
tests/test_precedence.py reorders it in a copy of the tree and sees both change.

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

# The verdicts of the checks against a pack's issuance and state, as opposed to a scan that does
# not parse or repeats within its settlement: what counts as a flagged line of a site
# (ABNORMAL_SITE, docs/leads.md).
PACK_FLAGS = tuple(v for v in PRECEDENCE if v not in ("MALFORMED", "DUPLICATE_IN_REQUEST"))

# Issuance statuses; every status but ACTIVE blocks dispensing.
STATUSES = ("ACTIVE", "RECALLED", "LOCKED", "STOLEN", "DESTROYED")

# Event types as the scripts write them in a code's history and the audit stream.
EVENTS = ("DISPENSED", "ATTEMPT", "REVERSED", "STATUS_CHANGED")


def sql_in(verdicts) -> str:
    """A SQL IN-list of verdicts: ('A', 'B')."""
    return "(" + ", ".join(f"'{v}'" for v in verdicts) + ")"


def lua_precedence() -> str:
    """PRECEDENCE as a Lua table body (MALFORMED is decided before Redis, so it is left out)."""
    return ", ".join(f"'{v}'" for v in PRECEDENCE if v != "MALFORMED")
