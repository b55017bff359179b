"""Issuance records: validation of what issuers upload, and status changes (locks, recalls).

Every record is validated by the rules core's validate_record (rules/issuance.py) before the store
sees it, on every path that writes issuance (the Admin RPCs and therefore `tracecode load`); the
store only stores. Its seams are plain typed objects: the API turns
protobuf into `IssuanceInput` / `UpsertBatch` and `UpsertSummary` back into protobuf.

May import: the codec and the plain modules (errors, verdicts, verifier's field rules) and the
store; never grpc or the generated stubs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from tracecode import codec
from tracecode.rules.text import problems as text_problems

from .errors import InvalidRequest, NotFound
from .store import Store, now_ms
from .store.types import IssuanceRecord
from tracecode.rules.verdicts import STATUSES
from tracecode.rules.rows import MAX_PRODUCT_ID
from tracecode.rules.issuance import (MAX_PACK_UNITS, TEXT_LIMITS, IssuanceInput, parse_expiry,  # noqa: F401 - the API's
                                      validate_record)

MAX_REASON, MAX_ACTOR = 500, 128  # a status change's reason and actor, as a sanction's

MAX_REPORTED_ERRORS = 100
# store.upsert_issuance outcome -> (response counter, error reason or None).
OUTCOMES = {
    0: ("unchanged", None),
    1: ("created", None),
    2: ("updated", None),
    3: ("conflicts", "conflict: stored record has another product (kept; use --replace)"),
    4: ("rejected", "pack_units: below the units already dispensed from this pack (record kept)"),
}


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
        _check_texts((("reason", reason, MAX_REASON, False), ("actor", actor, MAX_ACTOR, False)))
        code, _ = self._canonical(raw)
        (previous,) = self.store.set_status([code], status, now_ms=now_ms(), reason=reason, actor=actor)
        if not previous:
            raise NotFound(f"code {code} was never issued")
        return code, previous

    def recall_batch(self, product: str, batch: str, status: str, reason: str, actor: str) -> tuple[int, int]:
        _check_texts((("product_id", product, MAX_PRODUCT_ID, True), ("batch", batch, 64, True),
                      ("reason", reason, MAX_REASON, False), ("actor", actor, MAX_ACTOR, False)))
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


def _check_texts(fields) -> None:
    """InvalidRequest naming every admin text field that breaks the rules core's text rule (a
    reason or actor is stored with the status change and logged)."""
    bad = text_problems(fields)
    if bad:
        raise InvalidRequest(bad)
