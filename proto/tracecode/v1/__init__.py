"""Generated gRPC/protobuf stubs for tracecode.v1 (built from the .proto files beside this file)."""
