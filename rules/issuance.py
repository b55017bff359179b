"""Issuance records (`shared/spec/files.md`, issuance): what an issuer's row must be, checked the
same way on every path that reads one: `tracecode load` (clients/admin.py turns file rows into
records with `input_from_fields`), the server (server/issuance.py validates every record with
`validate_record` before the store sees it) and the leads engine (leads/inputs.py judges the rows
it rejects by these very functions).

Imports: the standard library, the rest of the rules core and the codec (tracecode.codec).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from tracecode import codec

from .rows import MAX_PRODUCT_ID, MAX_UNITS
from .text import text_problem
from .verdicts import STATUSES

__all__ = ["IssuanceInput", "FieldError", "TEXT_LIMITS", "MAX_PACK_UNITS", "parse_expiry", "input_from_fields",
           "validate_record"]

_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\Z")
# The most units a pack holds (a settlement row's units cap too: rows.py).
MAX_PACK_UNITS = MAX_UNITS
# Free-text issuance fields: (field, most characters). The product id has the limit a settlement
# line has, so no record can be stored that settlement would refuse to bill.
TEXT_LIMITS = (("product_id", MAX_PRODUCT_ID), ("batch", 64), ("manufacturer", 200))


class FieldError(ValueError):
    """A row's field that no record can carry: the field and why (never more of the row)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(slots=True)
class IssuanceInput:
    """One record as an issuer sent it. `status`: a status name, '' for none, or the text of a
    value the API could not name (then it is a record error)."""
    code: str
    product_id: str
    gtin: str = ""
    batch: str = ""
    expiry: str = ""
    pack_units: int = 0
    manufacturer: str = ""
    status: str = ""


def parse_expiry(text: str) -> int:
    """'YYYY-MM-DD' -> YYYYMMDD (ValueError "expiry: ..." when it is no calendar date)."""
    m = _DATE.match(text)
    if not m:
        raise ValueError(f"expiry: {text!r} is not YYYY-MM-DD")
    y, mo, d = map(int, m.groups())
    try:
        date(y, mo, d)  # rejects 2025-02-30
    except ValueError:
        raise ValueError(f"expiry: {text!r} is not a calendar date") from None
    return y * 10000 + mo * 100 + d


def input_from_fields(f: dict[str, str]) -> IssuanceInput:
    """One file row (its columns by name) -> IssuanceInput; a value a record cannot carry (an
    unknown status, a pack size that is no positive whole number) is a FieldError naming it.
    Everything else is validate_record's."""
    status = ""
    if f.get("status"):
        if f["status"].upper() not in STATUSES:
            raise FieldError("status", f"{f['status']!r} is not one of {', '.join(STATUSES)}")
        status = f["status"].upper()
    units = f.get("pack_units") or "1"
    if not (units.isdigit() and 1 <= int(units) <= 0xFFFFFFFF):
        raise FieldError("pack_units", f"{units!r} is not a positive whole number")
    return IssuanceInput(code=f["code"], product_id=f["product_id"], gtin=f.get("gtin", ""), batch=f.get("batch", ""),
                         expiry=f.get("expiry", ""), pack_units=int(units), manufacturer=f.get("manufacturer", ""),
                         status=status)


def validate_record(rec: IssuanceInput, profile=None) -> tuple:
    """An IssuanceInput -> the store's record tuple (code, product, gtin, batch, expiry YYYYMMDD
    or 0, pack units, manufacturer, status or ''), or ValueError naming the field."""
    kind, key, product, serial, batch, expiry, reason = codec.parse(rec.code, profile)
    if not key:
        raise ValueError(f"code: {reason}")
    for name, limit in TEXT_LIMITS:
        problem = text_problem(getattr(rec, name), limit, "the product the code was issued for",
                               required=name == "product_id")
        if problem:
            raise ValueError(f"{name}: {problem}")
    gtin = rec.gtin
    if kind == codec.KIND_GS1:
        if gtin and gtin.zfill(14) != product:
            raise ValueError(f"gtin: {gtin} differs from the GTIN {product} inside the code")
        gtin = product
    elif gtin and not (gtin.isdigit() and len(gtin) <= 14):
        raise ValueError(f"gtin: {gtin!r} is not a GTIN")
    exp = parse_expiry(rec.expiry) if rec.expiry else expiry
    if rec.expiry and expiry and exp != expiry:
        raise ValueError(f"expiry: {rec.expiry} differs from the expiry inside the code")
    if rec.batch and batch and rec.batch != batch:
        raise ValueError(f"batch: {rec.batch} differs from the batch {batch} inside the code")
    units = rec.pack_units or 1
    if units > MAX_PACK_UNITS:
        raise ValueError(f"pack_units: {units} is more than {MAX_PACK_UNITS}")
    status = rec.status
    if status and status not in STATUSES:
        raise ValueError(f"status: unknown value {status}")
    return (key, rec.product_id, gtin, rec.batch or batch, exp or 0, units, rec.manufacturer, status)
