"""Verdicts, their precedence and their wire names: data the verifier and the Lua script share.

The Lua script receives PRECEDENCE at load time (it is spliced into the script text), so the
order in which checks win lives in exactly one place: here.
"""
from tracecode.v1 import verification_pb2 as pb

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

VERDICT_ENUM = {name: pb.Verdict.Value(name) for name in ("OK",) + PRECEDENCE}

# Issuance statuses; every status but ACTIVE blocks dispensing.
STATUSES = ("ACTIVE", "RECALLED", "LOCKED", "STOLEN", "DESTROYED")
STATUS_ENUM = {name: pb.CodeStatus.Value(name) for name in STATUSES}
STATUS_NAME = {v: k for k, v in STATUS_ENUM.items()}

EVENT_ENUM = {
    "DISPENSED": pb.DISPENSED,
    "ATTEMPT": pb.DUPLICATE_ATTEMPT,
    "REVERSED": pb.REVERSED,
    "STATUS_CHANGED": pb.STATUS_CHANGED,
}


def lua_precedence() -> str:
    """PRECEDENCE as a Lua table body (MALFORMED is decided before Redis, so it is left out)."""
    return ", ".join(f"'{v}'" for v in PRECEDENCE if v != "MALFORMED")
