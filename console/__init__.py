"""tracecode.console: the inspectors' web console over the leads ledger (线索台账).

A Django project (settings, urls, wsgi) with one app, `tracecode.console.ledger`, which holds the
ledger (leads, evidence, history, actions, sanctions, weekly reports), its intake (leads files,
handed-down batches, the live settlement audit stream) and its web pages. `cli.py` is what
`tracecode console ...` runs.

May import: Django and the console extra's libraries, the rules core (`tracecode.rules`: the one
pseudonym function, insured ids, cells), `tracecode.server.failpoints`, `tracecode.clients` (gRPC
clients: the only way the console talks to the service, the audit feed included) and the
generated `tracecode.v1` stubs. Nothing else of `tracecode.server`, and no Redis.
"""
