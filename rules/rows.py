"""Settlement rows (`shared/spec/files.md`, settlement export): the one validation of a row's
fields that both readers of settlement files apply, `tracecode reverify` (clients/reverify.py,
row by row) and the leads engine (leads/inputs.py, column-wise over distinct values). Both take
the limits, the rules and the error texts from here, so a row one of them refuses the other
refuses with the same field and reason (tests/test_rows.py runs both over the same bad rows).

A row is refused as a whole, naming the first field (in FIELD_ORDER) that breaks its rule; the
reader writes it to errors.csv with file and line, and the row is neither sent nor judged.
Settlement-level rules (a settlement's line count, the code length and units limits of the
server's configuration, the 1970..2100 time range) stay with the server's validation, which both
readers also share (the leads engine calls the verifier's own function).

Error texts name the rule and never echo the value: a file whose columns are swapped can put an
insured id in any field, and errors.csv must never hold one (leads.md, Insured persons).

Imports: the standard library and the rest of the rules core only.
"""
from __future__ import annotations

import functools
import re
from datetime import datetime
from decimal import Decimal

from .insured import InsuredIdError, check as check_insured
from .text import text_problem

__all__ = ["FIELD_ORDER", "ID_PATTERN", "ID_RE", "MAX_ID", "MAX_PRODUCT_ID", "MAX_INT", "MAX_UNITS", "MAX_AMOUNT",
           "MAX_CODE", "CODE_REASON",
           "MAX_INSURED_RAW", "ID_REASON", "RESIDENT_WEIGHTS", "RESIDENT_CHECK", "RowProblem", "check_id",
           "settled_at_ms", "check_int", "check_units", "check_product", "check_insured_id", "amount_fen",
           "check_row"]

# The order fields are checked in: the first one that breaks its rule is the one reported.
FIELD_ORDER = ("site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units", "insured_id",
               "amount")

# Site and settlement ids end up in Redis keys, logs and reports: the verifier's alphabet.
MAX_ID = 64
ID_PATTERN = r"[A-Za-z0-9._\-]{1,%d}" % MAX_ID
ID_RE = re.compile(ID_PATTERN + r"\Z")
ID_REASON = f"required: 1-{MAX_ID} characters of A-Z a-z 0-9 . _ -"
# A scanned code: the server's max_code_length (its configuration, 512 by default) applies per
# settlement; this cap is for a row no configuration would accept, so a bulk job never sends a
# megabyte "code" in one message (gRPC refuses messages over 4 MB and the job would stop).
MAX_CODE = 4096
CODE_REASON = f"more than {MAX_CODE} characters"
# A billed product id's length (the verifier's too: server/verifier.py takes it from here).
MAX_PRODUCT_ID = 64
# line_no: digits only, within a signed 32-bit integer, so a row never overflows the protobuf
# field (uint32) or an engine's integer column.
MAX_INT = 2 ** 31 - 1
_MAX_INT_DIGITS = len(str(MAX_INT))
# units: digits only, at most what the largest pack holds (the issuance limit: server/issuance.py
# takes it from here): more is no sale of one pack, and the server's message for it
# would repeat the number, which in a file with swapped columns can be an insured id. The
# server's max_units (its configuration) still applies per settlement.
MAX_UNITS = 100_000
# amount: yuan the fund paid for one line, e.g. 36.50 (files.md). Plain decimal notation, exact
# in fen, 0 .. 99,999,999.99: a line of a hundred million yuan is a typo or a swapped column,
# and the console stores sums of them in DECIMAL(16, 2).
MAX_AMOUNT = Decimal("99999999.99")
_AMOUNT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?\Z")
_FEN = Decimal("0.01")
# GB 11643-1999's check character (rules/insured.py), as data for a column-wise check (the leads
# engine checks millions of ids with Arrow and sends only the rest through check_insured_id):
# the weights 2^(17-i) mod 11 of the 17 digits, and the character for each weighted sum mod 11.
# tests/test_rows.py holds them equal to insured.resident_check_char.
RESIDENT_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
RESIDENT_CHECK = "10X98765432"
# An insured id before normalisation: spaces and dashes between its groups are allowed, a
# kilobyte of them is not (normalising it would be wasted work).
MAX_INSURED_RAW = 128
TIME_EXAMPLE = "2024-05-06T10:15:00+08:00"


class RowProblem(ValueError):
    """A field of a row breaks its rule: the field's name and the rule, never the value."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def check_id(value: str) -> str | None:
    """Why a site or settlement id is refused, or None."""
    return None if ID_RE.match(value) else ID_REASON


@functools.lru_cache(maxsize=4096)
def settled_at_ms(text: str) -> int | str:
    """settled_at as epoch milliseconds, or the reason it is refused (a str). ISO 8601 with an
    offset (`Z` for UTC). Cached: every row of a settlement repeats its time."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return f"not an ISO 8601 time with an offset, e.g. {TIME_EXAMPLE}"
    if t.tzinfo is None:
        return f"needs an offset, e.g. {TIME_EXAMPLE}"
    try:
        return int(t.timestamp() * 1000)
    except (OverflowError, ValueError):  # year 1 or 9999 shifted past the calendar by its offset
        return "outside the calendar"


def check_int(value: str, low: int, high: int = MAX_INT) -> str | None:
    """Why line_no (1..MAX_INT) or units (0..MAX_UNITS; '' means 0) is refused, or None."""
    if value.isdigit() and value.isascii() and len(value) <= _MAX_INT_DIGITS and low <= int(value) <= high:
        return None
    return f"not an integer {low}..{high}"


def check_units(value: str) -> str | None:
    """Why units is refused, or None ('' means the whole pack, 0)."""
    return check_int(value or "0", 0, MAX_UNITS)


def check_product(value: str) -> str | None:
    """Why a billed product id is refused, or None (rules/text.py: no control, format or
    line-separator character; at most MAX_PRODUCT_ID characters)."""
    return text_problem(value, MAX_PRODUCT_ID, "product_id")


def check_insured_id(value: str) -> str:
    """The normalised insured id ('' when absent); RowProblem naming insured_id and the rule."""
    if len(value) > MAX_INSURED_RAW:
        raise RowProblem("insured_id", f"{len(value)} characters before normalisation, at most {MAX_INSURED_RAW}")
    try:
        return check_insured(value)
    except InsuredIdError as exc:
        raise RowProblem("insured_id", exc.rule) from None


def amount_fen(value: str) -> int | None:
    """An amount in yuan as integer fen (None when absent); RowProblem naming amount and the rule.
    Plain notation only: an exponent (1e20), Infinity or NaN is refused, not interpreted."""
    if not value:
        return None
    if not _AMOUNT.match(value):
        raise RowProblem("amount", f"not an amount in yuan (digits, optionally a point and decimals), 0..{MAX_AMOUNT}")
    d = Decimal(value)
    if d != d.quantize(_FEN):
        raise RowProblem("amount", "more than two decimal places (fen)")
    if d > MAX_AMOUNT:
        raise RowProblem("amount", f"more than {MAX_AMOUNT} yuan")
    return int(d * 100)


def check_row(fields: dict[str, str]) -> RowProblem | None:
    """The first field of a row (FIELD_ORDER) that breaks its rule, or None. `fields` are the
    stripped cells as clients/files.py reads them (required fields already present). On success
    the parsed values ride on the dict: `_at` (ms), `_insured` (normalised id), `_fen`.
    Written for `tracecode reverify`'s loop (once per row): each rule's common case is one test,
    and the rule's own function runs only when that test fails."""
    get = fields.get
    site, sid = get("site_id") or "", get("settlement_id") or ""
    if not ID_RE.match(site):
        return RowProblem("site_id", ID_REASON)
    if not ID_RE.match(sid):
        return RowProblem("settlement_id", ID_REASON)
    at = settled_at_ms(get("settled_at") or "")
    if at.__class__ is str:
        return RowProblem("settled_at", at)
    line_no = get("line_no") or ""
    if not (line_no.isdigit() and len(line_no) < _MAX_INT_DIGITS and line_no.isascii() and int(line_no) >= 1) \
            and (problem := check_int(line_no, 1)):
        return RowProblem("line_no", problem)
    if len(get("code") or "") > MAX_CODE:
        return RowProblem("code", CODE_REASON)
    product = get("product_id") or ""
    if not (product and len(product) <= MAX_PRODUCT_ID and product.isascii() and product.isprintable()) \
            and (problem := check_product(product)):
        return RowProblem("product_id", problem)
    units = get("units") or "0"
    if not (units.isdigit() and len(units) < 6 and units.isascii()) and (problem := check_units(units)):
        return RowProblem("units", problem)
    insured = get("insured_id") or ""
    amount = get("amount") or ""
    try:
        insured = check_insured_id(insured) if insured else ""
        fen = amount_fen(amount) if amount else None
    except RowProblem as exc:
        return exc
    fields["_at"] = at  # type: ignore[assignment]  # parsed values ride on the row
    fields["_insured"] = insured
    fields["_fen"] = fen  # type: ignore[assignment]
    return None
