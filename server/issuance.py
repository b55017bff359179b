"""Issuance records: validation of what issuers upload, and status changes (locks, recalls).

Validation happens here, once, for every path that writes issuance (the Admin RPCs and therefore
`tracecode load`); the store only stores. Its seams are plain typed objects: the API turns
protobuf into `IssuanceInput` / `UpsertBatch` and `UpsertSummary` back into protobuf.

May import: the codec and the plain modules (errors, verdicts, verifier's field rules) and the
store; never grpc or the generated stubs.
"""
from __future__ import annotations

import re
from datetime import date
from dataclasses import dataclass, field
from typing import Iterable

from tracecode import codec

from .errors import InvalidRequest, NotFound
from .store import Store, now_ms
from .store.types import IssuanceRecord
from .verdicts import STATUSES
from .verifier import MAX_PRODUCT_ID, text_problem

_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\Z")
MAX_REPORTED_ERRORS = 100
MAX_PACK_UNITS = 100_000
# Free-text issuance fields: (field, most characters). The product id has the limit a settlement
# line has, so no record can be stored that settlement would refuse to bill.
TEXT_LIMITS = (("product_id", MAX_PRODUCT_ID), ("batch", 64), ("manufacturer", 200))
# store.upsert_issuance outcome -> (response counter, error reason or None).
OUTCOMES = {
    0: ("unchanged", None),
    1: ("created", None),
    2: ("updated", None),
    3: ("conflicts", "conflict: stored record has another product (kept; use --replace)"),
    4: ("rejected", "pack_units: below the units already dispensed from this pack (record kept)"),
}


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


@dataclass(slots=True)
class UpsertBatch:
    records: list[IssuanceInput]
    replace: bool = False
    source: str = ""
    first_line: int = 0  # line of records[0] in the source, 0 when unknown


@dataclass(slots=True)
class RecordError:
    source: str
    line: int
    code: str
    reason: str


@dataclass(slots=True)
class UpsertSummary:
    received: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    conflicts: int = 0
    rejected: int = 0
    errors: list[RecordError] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS


def validate_record(rec: IssuanceInput, profile=None) -> tuple:
    """An IssuanceInput -> the store's record tuple, or ValueError naming the field. No store
    involved: the leads engine judges issuance rows by this very function."""
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


class IssuanceService:
    def __init__(self, store: Store, profile=None, chunk: int = 500):
        self.store = store
        self.profile = profile
        self.chunk = chunk

    def _canonical(self, raw: str) -> tuple[str, tuple]:
        parsed = codec.parse(raw, self.profile)
        if not parsed[codec.KEY]:
            raise InvalidRequest([("raw_code", parsed[codec.REASON])])
        return parsed[codec.KEY], parsed

    def validate(self, rec: IssuanceInput) -> tuple:
        """An IssuanceInput -> the store's record tuple, or ValueError naming the field."""
        return validate_record(rec, self.profile)

    def upsert_stream(self, requests: Iterable[UpsertBatch]) -> UpsertSummary:
        resp = UpsertSummary()

        def report(source, line, code, reason):
            if len(resp.errors) < MAX_REPORTED_ERRORS:
                resp.errors.append(RecordError(source, line, code, reason))

        def error(source, line, code, reason):
            resp.rejected += 1
            report(source, line, code, reason)

        for req in requests:
            valid, where = [], []
            for offset, rec in enumerate(req.records):
                resp.received += 1
                line = req.first_line + offset if req.first_line else 0
                try:
                    valid.append(self.validate(rec))
                    where.append((line, rec.code))
                except ValueError as exc:
                    error(req.source, line, rec.code, str(exc))
            for start in range(0, len(valid), self.chunk):
                outcomes = self.store.upsert_issuance(valid[start:start + self.chunk], replace=req.replace)
                for (line, code), outcome in zip(where[start:start + self.chunk], outcomes):
                    counter, why = OUTCOMES[outcome]
                    setattr(resp, counter, getattr(resp, counter) + 1)
                    if why:
                        report(req.source, line, code, why)
        return resp

    def get(self, raw: str) -> tuple[str, IssuanceRecord]:
        code, _ = self._canonical(raw)
        record = self.store.get_issuance(code)
        if record is None:
            raise NotFound(f"code {code} was never issued")
        return code, record

    def set_status(self, raw: str, status: str, reason: str, actor: str) -> tuple[str, str]:
        assert status in STATUSES
        code, _ = self._canonical(raw)
        (previous,) = self.store.set_status([code], status, now_ms=now_ms(), reason=reason, actor=actor)
        if not previous:
            raise NotFound(f"code {code} was never issued")
        return code, previous

    def recall_batch(self, product: str, batch: str, status: str, reason: str, actor: str) -> tuple[int, int]:
        bad = [(f, "required") for f, v in (("product_id", product), ("batch", batch)) if not v]
        if bad:
            raise InvalidRequest(bad)
        changed = unchanged = 0
        for codes in self.store.batch_codes(product, batch):
            # The batch index may list codes whose record has since moved to another product or
            # batch (replace, correction, refused conflict): the script skips those ('' back).
            for prev in self.store.set_status(codes, status, now_ms=now_ms(), reason=reason, actor=actor,
                                              only=(product, batch)):
                if prev == status:
                    unchanged += 1
                elif prev:
                    changed += 1
        return changed, unchanged
