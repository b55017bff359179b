"""The API: the only code that speaks gRPC or touches the generated stubs (tracecode.v1).

It holds the servicers (servicer.py: Verification and Admin; bulk.py: the BulkVerification
stream), the conversions between protobuf and the rules modules' plain objects (convert.py), the
mapping of domain errors to statuses (status.py), the interceptors (metrics, drain, log context),
authentication, rate limiting and TLS (auth.py), and the assembled gRPC server with its health
service (server.py). Handlers are thin: rules live in the verifier, Redis in the store.

May import: grpc and its companions, protobuf, tracecode.v1, and the plain modules of
tracecode.server (verifier, issuance, errors, config, metrics, logs, priority, verdicts) and the
store's typed seam (store.types). It must not reach past the verifier into the store's calls.
"""
