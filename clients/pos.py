"""A pharmacy POS client: one call per settlement, with a deadline and safe retries.

Retries reuse the settlement id (and the very same request), so a retry after a lost answer returns
the stored results instead of marking anything twice.
"""
from __future__ import annotations

import random
import time
import uuid
from datetime import datetime, timezone
from typing import Iterable, Sequence

import grpc

from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc

# Statuses after which the same request may succeed: the server or Redis was briefly away.
# CANCELLED too: a server that is shutting down cancels calls it had not started, and a retry
# with the same settlement id is safe (idempotent).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


def new_settlement_id() -> str:
    return uuid.uuid4().hex


def line(raw_code: str, product_id: str, units: int = 0) -> pb.DispenseLine:
    return pb.DispenseLine(raw_code=raw_code, product_id=product_id, units=units)


def timestamp(when: datetime | None = None):
    from google.protobuf import timestamp_pb2
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime((when or datetime.now(timezone.utc)).astimezone(timezone.utc))
    return ts


class PosClient:
    def __init__(self, target: str | grpc.Channel, *, deadline_s: float = 2.0, retries: int = 3,
                 backoff_s: float = 0.1, max_backoff_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] = ()):
        if isinstance(target, str):
            self.channel = (grpc.secure_channel(target, credentials) if credentials
                            else grpc.insecure_channel(target))
            self._owns = True
        else:
            self.channel, self._owns = target, False
        self.stub = verification_pb2_grpc.VerificationStub(self.channel)
        self.deadline_s, self.retries, self.backoff_s = deadline_s, retries, backoff_s
        self.max_backoff_s = max_backoff_s
        self.metadata = tuple(metadata)

    def close(self) -> None:
        if self._owns:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request):
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.deadline_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt >= self.retries:
                    raise
                attempt += 1
                # Exponential backoff with jitter, capped: a POS must not sleep for minutes.
                time.sleep(min(self.backoff_s * (2 ** (attempt - 1)), self.max_backoff_s) * (0.5 + random.random() / 2))

    def verify(self, site_id: str, lines: Iterable[pb.DispenseLine], *, settlement_id: str | None = None,
               settled_at: datetime | None = None, all_or_nothing: bool = False,
               insured_id: str = "") -> pb.VerifyDispenseResponse:
        request = pb.VerifyDispenseRequest(
            settlement_id=settlement_id or new_settlement_id(), site_id=site_id,
            settled_at=timestamp(settled_at), lines=list(lines),
            policy=pb.ALL_OR_NOTHING if all_or_nothing else pb.RECORD_ACCEPTED, insured_id=insured_id)
        return self._call(self.stub.VerifyDispense, request)

    def reverse(self, site_id: str, settlement_id: str, line_indexes: Sequence[int] = (),
                reason: str = "") -> pb.ReverseDispenseResponse:
        return self._call(self.stub.ReverseDispense, pb.ReverseDispenseRequest(
            site_id=site_id, settlement_id=settlement_id, line_indexes=list(line_indexes), reason=reason))

    def check(self, lines: Iterable[pb.DispenseLine], site_id: str = "", insured_id: str = "") -> pb.CheckCodesResponse:
        return self._call(self.stub.CheckCodes, pb.CheckCodesRequest(site_id=site_id, lines=list(lines),
                                                                     insured_id=insured_id))

    def history(self, raw_code: str) -> pb.GetCodeHistoryResponse:
        return self._call(self.stub.GetCodeHistory, pb.GetCodeHistoryRequest(raw_code=raw_code))
