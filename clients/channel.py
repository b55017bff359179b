"""What every operator-side client of tracecode shares: a channel to the server (plain, or TLS
with the given credentials, or one the caller made), the call metadata (a bearer token) and a
default deadline. AdminClient and AuditFeedClient stand on it; PosClient keeps its own (it
retries with a deadline per settlement).

May import: grpc.
"""
from __future__ import annotations

import grpc


class Client:
    """A channel to the server with metadata and a default timeout; closes with `with`."""

    def __init__(self, target: str | grpc.Channel, *, credentials: grpc.ChannelCredentials | None = None,
                 metadata=(), timeout_s: float = 30.0):
        if isinstance(target, str):
            self.channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        else:
            self.channel = target
        self.metadata, self.timeout_s = tuple(metadata), timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
