"""Clients of the tracecode gRPC API: the POS client, the admin client, the `tracecode` CLI."""
