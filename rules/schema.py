"""The record and stream schema: the shapes the server's Redis scripts take and give back, the
audit streams and their entries. Written once, here; the store renders it into Lua
(server/store/layout.py), the wire module (tracecode.codec.wire) packs and unpacks rows by it,
and the readers of the audit streams name their fields from it.

    ScriptRow       one line's result as verify.lua reports and stores it (ROW_FIELDS, in order;
                    ROW_INT_POSITIONS the int fields; OWN the first of the three first-dispense
                    fields a stored record writes '=', '', '' when the dispense is its own;
                    VERDICT, STATUS, OK_VERDICT, ACTIVE_STATUS: the packed row's defaults)
    VERIFY_ARGV     verify.lua's fixed arguments, then LINE_FIELDS per line, then the codes
    ENTRY_FIELDS    a code's packed value in its bucket hash; LOT_FIELDS a lot's
    US, RS          the separators of the packed forms (free text never holds them: text.py)
    BUCKETS         the hash tags, and so the audit streams: audit_stream(prefix, bucket)
    AUDIT_FIELDS    the fields of an audit stream entry, by letter

Imports: the standard library only.
"""
from __future__ import annotations

from typing import NamedTuple, get_type_hints

__all__ = ["ScriptRow", "ROW_FIELDS", "ROW_INT_POSITIONS", "ROW_WIDTH", "OWN", "VERDICT", "STATUS", "OK_VERDICT",
           "ACTIVE_STATUS", "VERIFY_ARGV", "LINE_FIELDS",
           "ROW_INTERNAL", "RECEIVE_ARGV", "RECEIVE_LINE_FIELDS", "ENTRY_FIELDS", "LOT_FIELDS", "US", "RS", "BUCKETS",
           "TAGS", "audit_stream", "AUDIT_FIELDS", "AUDIT_TYPES"]


class ScriptRow(NamedTuple):
    """One line's result as verify.lua reports it (a row of its results, in this order).
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
    # The site whose receiving check (入库核验, receive.lua) last accepted the pack as stock, ''
    # when none did: the verifier turns it into the line's receipt notice (another site's
    # stock, or no receipt where the deployment requires one).
    received_by: str


ROW_FIELDS = ScriptRow._fields
ROW_WIDTH = len(ROW_FIELDS)
# The positions of the int fields of a row (the packed results hold text).
ROW_INT_POSITIONS = tuple(i for i, t in enumerate(get_type_hints(ScriptRow).values()) if t is int)
# A stored record writes its own first dispense as '=', '', '' from this position on (site,
# settlement id, time): the record's own site, id and time complete them when it is read.
OWN = ROW_FIELDS.index("first_site_id")
# The packed row (verify.lua's answer and a settlement record's stored form) writes the common
# values as nothing, since a record is kept for every settlement for weeks (docs/scaling.md): an
# int 0 as '', the verdict OK of a pack whose status is ACTIVE (the usual line) as '' in both
# places, and a row's trailing empty fields left off. A verdict is never '' (the encoders refuse
# one), so '' can only be that OK.
VERDICT = ROW_FIELDS.index("verdict")
STATUS = ROW_FIELDS.index("status")
OK_VERDICT, ACTIVE_STATUS = "OK", "ACTIVE"

# verify.lua's fixed arguments, in ARGV order (1-based in Lua).
VERIFY_ARGV = (
    "mode",              # 'D' dispense, 'C' check only, 'P' prepare (cluster two-phase)
    "site",
    "settlement_id",
    "settled_at_ms",
    "settle_day",        # YYYYMMDD in the issuer's calendar
    "digest",            # idempotency digest of the body, packed (rules/packing.py)
    "policy",            # 'R' record accepted, 'A' all or nothing
    "audit_max",         # audit stream max length (MAXLEN ~); 0 writes no events (a job namespace);
                         # < 0: archived, -audit_max the hard bound (server/store/lua/_audit.lua)
    "history_max",       # events kept per code
    "settlement_ttl_s",  # settlement record lifetime
    "n_lines",
    "state_ttl",         # dispense state ttl, s (0 none); in mode 'P' the reservation's life, ms
    "buyer",             # the insured pseudonym packed (rules/packing.py): an entry's first buyer
    "site_packed",       # the site and the settlement id packed (rules/packing.py id_field), as an
    "settlement_packed", # entry keeps them: the server packs them once, not Redis once per code
)
# Per line, after the fixed arguments (offsets from the line's first argument).
LINE_FIELDS = ("code_index", "product_id", "units", "malformed_reason", "line_index")
# The script-internal slots after a row's ROW_FIELDS (removed before a row is stored).
ROW_INTERNAL = ("code_index", "want")

# One code's value in its bucket hash, fields joined by US, trailing empty fields left off.
ENTRY_FIELDS = (
    "lot",     # lot id in the tag's lot dictionary ('' in a bulk job's namespace: state only)
    "status",  # '' = ACTIVE, else the status text (LOCKED, RECALLED, ...)
    # The site that last received the pack as stock (receive.lua), '' none. Third, so a received
    # pack not yet sold costs two separators and the site, not one per dispense field.
    "rs",
    "u",       # units used
    "fs",      # first dispense of the current use cycle: site, settlement id, settled_at ms
    "fi",
    "fa",
    "at",      # duplicate attempts against that first dispense
    "fp",      # the first buyer's insured pseudonym
    "ev",      # events ever logged for the code (kept or not); '=' the plain first dispense: ev 1,
               # fd 0, fu = u, written as '=' with fd and fu empty (lua/_state.lua entry_write)
    "fd",      # position of the first-ever DISPENSED event among the kept events ('' none yet)
    "fl",      # that event's line index and units, while it is implicit (fx = '')
    "fu",
    "fx",      # '1': the first-ever DISPENSED event was written out into the history list
    "rv",      # cluster two-phase reservations, json (verify.lua 'P')
)
# receive.lua's fixed arguments (入库核验: one delivery's lines in one slot), in ARGV order; then
# RECEIVE_LINE_FIELDS per line, then the distinct codes.
RECEIVE_ARGV = (
    "site",
    "delivery_id",
    "supplier",
    "received_at_ms",
    "receive_day",       # YYYYMMDD in the issuer's calendar (expiry is judged against it)
    "digest",            # idempotency digest of the delivery's lines in this slot
    "audit_max",         # as VERIFY_ARGV's
    "record_ttl_s",      # the delivery record's lifetime
    "n_lines",
)
RECEIVE_LINE_FIELDS = ("code_index", "product_id", "malformed_reason", "line_index")
# A lot, in the lot dictionary of its hash tag.
LOT_FIELDS = ("product_id", "gtin", "batch", "expiry", "pack_units", "manufacturer")
US, RS = "\x1f", "\x1e"

# The hash tags: a code's bucket is crc32(code) mod BUCKETS (store/keys.py); each bucket has one
# audit stream. Fixed for the life of a data set (its marker holds it).
BUCKETS = 1024
TAGS = tuple("{%04d}" % b for b in range(BUCKETS))


def audit_stream(prefix: str, bucket: int) -> str:
    """The name of a bucket's audit stream under a key prefix."""
    return f"{prefix}:{TAGS[bucket]}:audit"


# An audit stream entry's fields by letter (the scripts write the letters), what each holds.
AUDIT_FIELDS = {
    "t": "type: one of AUDIT_TYPES",
    "c": "canonical code ('' for a refusal or a sanction change)",
    "s": "site id (a status change: the actor)",
    "i": "settlement id",
    "l": "line index within the settlement (-1: the settlement as a whole)",
    "u": "units",
    "x": "ATTEMPT: the verdict; REFUSED: the refusal's reason (a live rule: its model); NOTICE: the model; REVERSED: the return's reason; "
         "STATUS_CHANGED: the change; sanction changes: the sanction's reason",
    "a": "time, ms since the epoch (a settlement's: its settled_at; otherwise the server's clock)",
    "p": "insured pseudonym (never a raw id)",
    "n": "sanction id (REFUSED and sanction changes)",
    "k": "sanction kind (REFUSED and sanction changes)",
    "r": "sanction reference",
    "b": "sanction actor",
    "g": "the billed product id of the line (DISPENSED, ATTEMPT; not on a cluster two-phase commit's DISPENSED); "
         "NOTICE and a live rule's REFUSED: the product (STOCKPILING); RECEIVED, RECEIVE_FLAGGED: the product on "
         "the delivery line",
    "f": "NOTICE and a live rule's REFUSED: the rule's figures, json (m model, v version, a action, k packs, "
         "s sites, g product, w window hours)",
    "d": "RECEIVED, RECEIVE_FLAGGED: the supplier (i is the delivery id, x the verdict when flagged)",
}
# NOTICE: a live rule (rules/live.py) held at a settlement; x the model, u the packs. RECEIVED: a
# pack accepted as stock at the receiving check; RECEIVE_FLAGGED: one that was not (a resold pack
# offered as stock is DUPLICATE here).
AUDIT_TYPES = ("DISPENSED", "ATTEMPT", "REVERSED", "STATUS_CHANGED", "REFUSED", "SANCTION_SET", "SANCTION_LIFTED",
               "NOTICE", "RECEIVED", "RECEIVE_FLAGGED")
