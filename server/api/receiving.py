"""tracecode.v1.Receiving: the receiving check (入库核验) over gRPC, thin as the verification
servicer is: proto -> ReceivingService (server/receiving.py) -> proto."""
from __future__ import annotations

import time

from tracecode.v1 import receiving_pb2 as rpb
from tracecode.v1 import receiving_pb2_grpc

from .. import metrics, priority
from ..receiving import DeliveryLine, ReceivingService
from . import convert
from .convert import STATUS_ENUM, VERDICT_ENUM
from .status import guarded


class ReceivingServicer(receiving_pb2_grpc.ReceivingServicer):
    def __init__(self, service: ReceivingService, site_of):
        self.service = service
        # site_of(claimed, context) -> (site, viewer): the verification servicer's own rule (a
        # pharmacy acts for its own site only; viewer None for admins and unauthenticated servers).
        self.site_of = site_of

    @priority.foreground
    @guarded
    def ReceivePacks(self, request: rpb.ReceivePacksRequest, context) -> rpb.ReceivePacksResponse:
        site, viewer = self.site_of(request.site_id, context)
        at = convert.ms(request.received_at, "received_at") if request.HasField("received_at") else None
        start = time.perf_counter()
        out = self.service.receive(site, request.delivery_id, request.supplier, at,
                                   [DeliveryLine(ln.code, ln.product_id) for ln in request.lines])
        metrics.observe_receiving(out, time.perf_counter() - start)
        results = []
        for i, o in enumerate(out.results):
            r = rpb.ReceiveResult(line_index=i, verdict=VERDICT_ENUM[o.verdict], canonical_code=o.canonical_code,
                                  reason=o.reason, issued_product_id=o.issued_product_id,
                                  received_elsewhere_before=bool(o.received_before),
                                  # Which other site had it: for regulators, not another pharmacy.
                                  received_before_site_id=o.received_before if viewer is None else "")
            if o.status:
                r.code_status = STATUS_ENUM.get(o.status, 0)
            if o.first_site_id:
                r.evidence.first_site_id = o.first_site_id
                r.evidence.first_settled_at.CopyFrom(convert.ts(o.first_settled_at_ms))
            results.append(r)
        return rpb.ReceivePacksResponse(site_id=site, delivery_id=request.delivery_id, results=results,
                                        accepted=out.accepted, replayed=out.replayed)
