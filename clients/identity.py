"""IdentityClient: WhoAmI, who the server takes the caller (its token or certificate) to be.

May import: grpc and the generated stubs."""
from __future__ import annotations

from tracecode.v1 import identity_pb2 as ipb
from tracecode.v1 import identity_pb2_grpc

from .channel import Client


class IdentityClient(Client):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stub = identity_pb2_grpc.IdentityStub(self.channel)

    def whoami(self, metadata=None) -> ipb.WhoAmIResponse:
        """The caller; `metadata` (e.g. another party's bearer token) instead of the client's own."""
        return self.stub.WhoAmI(ipb.WhoAmIRequest(), metadata=self.metadata if metadata is None else tuple(metadata),
                                timeout=self.timeout_s)
