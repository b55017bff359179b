"""ReceivingClient: the receiving check (入库核验) of a delivery, and `tracecode receive FILE`, which
sends a distributor's shipment file one delivery at a time.

A shipment file (CSV/JSONL/.gz/Parquet, files.md's readers) has one row per pack:
`delivery_id` and `code` required, `product_id`, `supplier` and `site_id` optional. The rows of
one delivery id go in one call, in file order. A delivery with any bad row is not sent at all
(its rows are reported by file, line and field): receiving part of a delivery note and the rest
later would be another body under the same id. A row that cannot be read at all (no delivery
id, bytes that are not UTF-8) belongs to no known delivery, so then nothing of the file is sent.
A retry sends the very same request, so a lost answer is recovered as the stored one (the call
is idempotent on site and delivery id).

May import: grpc, the generated stubs and the clients package.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc

from tracecode.v1 import receiving_pb2 as rpb
from tracecode.v1 import receiving_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from .channel import Client
from .files import RowError, read_rows
from .pos import RETRYABLE, timestamp

# delivery_id is required by the reader; code is checked here, so that a row without one holds
# back its own delivery (a RowError of the reader names no delivery).
RECEIPT_FIELDS = {"delivery_id": True, "code": False, "product_id": False, "supplier": False, "site_id": False}


class ReceivingClient(Client):
    def __init__(self, *args, retries: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.stub = receiving_pb2_grpc.ReceivingStub(self.channel)
        self.retries = retries

    def receive(self, site_id: str, delivery_id: str, lines: list[tuple[str, str]], *, supplier: str = "",
                received_at: datetime | None = None) -> rpb.ReceivePacksResponse:
        """lines: (code, product id) per pack."""
        request = rpb.ReceivePacksRequest(
            site_id=site_id, delivery_id=delivery_id, supplier=supplier,
            received_at=timestamp(received_at or datetime.now(timezone.utc)),
            lines=[rpb.ReceiveLine(code=c, product_id=p) for c, p in lines])
        attempt = 0
        while True:
            try:
                return self.stub.ReceivePacks(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt >= self.retries:
                    raise
                attempt += 1
                time.sleep(min(0.1 * 2 ** attempt, 2.0) * (0.5 + random.random() / 2))


@dataclass
class Delivery:
    site_id: str
    delivery_id: str
    supplier: str = ""
    lines: list[tuple[str, str]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # each line's row in the file
    errors: list[RowError] = field(default_factory=list)


def read_deliveries(path: str, site: str = "") -> tuple[list[Delivery], list[RowError]]:
    """The file's deliveries in order of first appearance, and the rows that belong to none. A row
    naming another site than `site` (when given), or a supplier other than its delivery's first,
    is an error of that delivery."""
    by_id: dict[tuple[str, str], Delivery] = {}
    loose: list[RowError] = []
    for row in read_rows(path, RECEIPT_FIELDS):
        if isinstance(row, RowError):
            loose.append(row)  # which delivery it belonged to cannot be known
            continue
        f = row.fields
        row_site = f.get("site_id") or site
        if site and f.get("site_id") and f["site_id"] != site:
            loose.append(RowError(path, row.line, "site_id", f"{f['site_id']!r}, but --site says {site!r}"))
            continue
        if not row_site:
            loose.append(RowError(path, row.line, "site_id", "required: no site_id column and no --site"))
            continue
        d = by_id.setdefault((row_site, f["delivery_id"]), Delivery(row_site, f["delivery_id"], f.get("supplier", "")))
        if f.get("supplier", "") and d.supplier and f["supplier"] != d.supplier:
            d.errors.append(RowError(path, row.line, "supplier", f"{f['supplier']!r}, but the delivery's first row "
                                                                 f"says {d.supplier!r}"))
            continue
        if not f.get("code"):
            d.errors.append(RowError(path, row.line, "code", "required field is missing or empty"))
            continue
        d.supplier = d.supplier or f.get("supplier", "")
        d.lines.append((f["code"], f.get("product_id", "")))
        d.rows.append(row.line)
    return list(by_id.values()), loose


def verdict_name(v: int) -> str:
    return pb.Verdict.Name(v)
