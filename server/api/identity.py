"""tracecode.v1.Identity: the caller as the AuthInterceptor authenticated it (auth.py).

The ledger console's pharmacy API sends a pharmacy's bearer token here rather than verifying it
itself: one verification (auth.Authenticator), and the token secret stays on the servers."""
from __future__ import annotations

from tracecode.v1 import identity_pb2 as ipb
from tracecode.v1 import identity_pb2_grpc

from .auth import current_caller


class IdentityServicer(identity_pb2_grpc.IdentityServicer):
    def WhoAmI(self, request: ipb.WhoAmIRequest, context) -> ipb.WhoAmIResponse:
        who = current_caller()  # set by the AuthInterceptor; None on a server without authentication
        if who is None:
            return ipb.WhoAmIResponse(authenticated=False)
        return ipb.WhoAmIResponse(authenticated=True, role=who.role, name=who.name)
