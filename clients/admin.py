"""The regulator operators' client: issuance uploads (streamed), status changes, recalls, sanctions."""
from __future__ import annotations

from datetime import datetime
from typing import Callable, Iterable, Iterator

import grpc

from tracecode.v1 import admin_pb2 as apb
from tracecode.v1 import admin_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from tracecode.rules.issuance import FieldError, input_from_fields

from .channel import Client
from .files import Row, RowError


def _record(f: dict[str, str]) -> apb.IssuanceInput:
    """One file row -> IssuanceInput message; a value no record can carry is a FieldError naming
    its field (the rules core's input_from_fields; the server validates everything else)."""
    rec = input_from_fields(f)
    return apb.IssuanceInput(
        code=rec.code, product_id=rec.product_id, gtin=rec.gtin, batch=rec.batch, expiry=rec.expiry,
        pack_units=rec.pack_units, manufacturer=rec.manufacturer,
        status=pb.CodeStatus.Value(rec.status) if rec.status else pb.CODE_STATUS_UNSPECIFIED)


class AdminClient(Client):
    def __init__(self, target: str | grpc.Channel, **kw):
        super().__init__(target, **kw)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)

    def upsert(self, rows: Iterable[Row | RowError], *, replace: bool = False, source: str = "",
               chunk: int = 500, progress: Callable[[int], None] | None = None,
               on_error: Callable[[RowError], None] | None = None) -> apb.UpsertIssuanceResponse:
        """Stream issuance rows in chunks; file-level row errors go to on_error, never to the server."""

        def requests() -> Iterator[apb.UpsertIssuanceRequest]:
            buf: list[apb.IssuanceInput] = []
            first, sent = 0, 0
            for row in rows:
                if not isinstance(row, RowError):
                    try:
                        record = _record(row.fields)
                    except FieldError as exc:
                        row = RowError(row.source, row.line, exc.field, exc.reason)
                if isinstance(row, RowError):
                    if on_error:
                        on_error(row)
                    continue
                # The server numbers a request's records first_line, first_line + 1, ...: a row
                # skipped above (or a blank line) breaks the run, so the next row opens a request.
                if buf and row.line and row.line != first + len(buf):
                    yield apb.UpsertIssuanceRequest(records=buf, replace=replace, source=source, first_line=first)
                    sent += len(buf)
                    buf = []
                if not buf:
                    first = row.line
                buf.append(record)
                if len(buf) >= chunk:
                    yield apb.UpsertIssuanceRequest(records=buf, replace=replace, source=source, first_line=first)
                    sent += len(buf)
                    if progress:
                        progress(sent)
                    buf = []
            if buf:
                yield apb.UpsertIssuanceRequest(records=buf, replace=replace, source=source, first_line=first)
                if progress:
                    progress(sent + len(buf))

        return self.stub.UpsertIssuance(requests(), metadata=self.metadata)

    def set_status(self, raw_code: str, status: str, reason: str = "") -> apb.SetCodeStatusResponse:
        return self.stub.SetCodeStatus(apb.SetCodeStatusRequest(
            raw_code=raw_code, status=pb.CodeStatus.Value(status), reason=reason),
            timeout=self.timeout_s, metadata=self.metadata)

    def recall(self, product_id: str, batch: str, status: str = "RECALLED", reason: str = ""):
        return self.stub.RecallBatch(apb.RecallBatchRequest(
            product_id=product_id, batch=batch, status=pb.CodeStatus.Value(status), reason=reason),
            timeout=self.timeout_s, metadata=self.metadata)

    def get(self, raw_code: str) -> pb.IssuanceRecord:
        return self.stub.GetIssuance(apb.GetIssuanceRequest(raw_code=raw_code),
                                     timeout=self.timeout_s, metadata=self.metadata)

    # Sanctions (docs/verification.md, "Sanctions").
    def set_sanction(self, kind: str, *, request_id: str, site_id: str = "", insured_id: str = "",
                     valid_from: datetime | None = None, valid_until: datetime | None = None,
                     reason: str = "", reference: str = "", actor: str = "",
                     insured_pseudonym: str = "") -> apb.Sanction:
        req = apb.SetSanctionRequest(request_id=request_id, kind=apb.SanctionKind.Value(kind), site_id=site_id,
                                     insured_id=insured_id, reason=reason, reference=reference, actor=actor,
                                     insured_pseudonym=insured_pseudonym)
        if valid_from is not None:
            req.valid_from.FromDatetime(valid_from)
        if valid_until is not None:
            req.valid_until.FromDatetime(valid_until)
        return self.stub.SetSanction(req, timeout=self.timeout_s, metadata=self.metadata)

    def lift_sanction(self, sanction_id: str, reason: str = "", actor: str = "") -> apb.Sanction:
        return self.stub.LiftSanction(apb.LiftSanctionRequest(sanction_id=sanction_id, reason=reason, actor=actor),
                                      timeout=self.timeout_s, metadata=self.metadata)

    def list_sanctions(self, *, site_id: str = "", insured_id: str = "", insured_pseudonym: str = "",
                       include_history: bool = False, reference: str = "") -> list[apb.Sanction]:
        return list(self.stub.ListSanctions(apb.ListSanctionsRequest(
            site_id=site_id, insured_id=insured_id, insured_pseudonym=insured_pseudonym,
            include_history=include_history, reference=reference),
            timeout=self.timeout_s, metadata=self.metadata).sanctions)


# Public for the leads engine (tracecode.leads), which checks issuance rows as `tracecode load` does.
