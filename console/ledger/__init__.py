"""tracecode.console.ledger: the leads ledger (线索台账) as a Django app.

    rules.py     the tables: statuses, transitions, causes, actions, sanction kinds, roles
    models.py    the ledger's tables (append-only history, actions, sanctions, report snapshots)
    workflow.py  every change to a lead: checks the role and the rules, writes the history entry
    intake.py    leads in: leads/evidence files, handed-down batches, complaints, live hits
    stream.py    the settlement audit stream consumer (Redis Streams consumer group)
    gateway.py   sanctions to tracecode's Admin API over gRPC, with a pending/retry queue
    report.py    the weekly report (周报表): counts, snapshot, XLSX in the bureau's layout
    effect.py    the models' effectiveness from the ledger: page figures, exports, Prometheus
    views.py     the pages; every view checks the user's role on the server
    login.py     login throttling per user name and per address

May import: Django, openpyxl, redis, prometheus_client, tracecode.rules (pseudonym, insured,
text, cells, model_status) and tracecode.server.failpoints (standard library only, for crash tests),
tracecode.clients and tracecode.v1.
"""
