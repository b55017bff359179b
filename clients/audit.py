"""The audit feed's client (proto/tracecode/v1/audit.proto): the server's audit events, read
through a named consumer group, at least once. Admin credentials (as AdminClient: channel
credentials for TLS or mTLS, metadata for a bearer token).

    with AuditFeedClient(target, metadata=...) as feed:
        for batch in feed.watch("ledger-console", "host-1"):
            keep(batch.events)                                  # commit first,
            feed.ack("ledger-console", [e.cursor for e in batch.events])   # then acknowledge

May import: grpc, the generated stubs. Nothing of the server.
"""
from __future__ import annotations

from typing import Iterator

import grpc

from tracecode.v1 import audit_pb2 as apb
from tracecode.v1 import audit_pb2_grpc

from .channel import Client


class AuditFeedClient(Client):
    def __init__(self, target: str | grpc.Channel, **kw):
        super().__init__(target, **kw)
        self.stub = audit_pb2_grpc.AuditFeedStub(self.channel)

    def watch(self, group: str, consumer: str, *, max_batch: int = 0, block_ms: int = 0, claim_idle_ms: int = 0,
              from_start: bool = False) -> Iterator[apb.AuditEventBatch]:
        """The batches of the group for this consumer, until cancelled (`.cancel()` on the
        returned iterator) or the server ends the call. No deadline: the call is meant to last.
        An empty batch is a heartbeat. The next batch comes once this one is acknowledged."""
        return self.stub.Watch(apb.WatchRequest(group=group, consumer=consumer, max_batch=max_batch,
                                                block_ms=block_ms, claim_idle_ms=claim_idle_ms,
                                                from_start=from_start), metadata=self.metadata)

    def ack(self, group: str, cursors: list[str]) -> int:
        """Acknowledge events by cursor (after what they mean is committed); how many were pending."""
        return self.stub.Ack(apb.AckRequest(group=group, cursors=cursors), timeout=self.timeout_s,
                             metadata=self.metadata).acked

    def reset(self, group: str) -> int:
        """The group back to the start of every stream (replay); the number of streams."""
        return self.stub.Reset(apb.ResetRequest(group=group), timeout=self.timeout_s, metadata=self.metadata).streams

    def status(self, group: str) -> tuple[int, int]:
        """(lag, pending) of the group."""
        s = self.stub.Status(apb.StatusRequest(group=group), timeout=self.timeout_s, metadata=self.metadata)
        return s.lag, s.pending
