"""History and submitted reports are append-only on SQLite too (the embedded default): an UPDATE
or DELETE of a ledger_entry or ledger_reportsnapshot row is refused by a trigger, whoever sends
it (QuerySet.update() and .delete() never call the model's save/delete guard). PostgreSQL has
had its triggers since 0002; this is the same rule in SQLite's dialect (RAISE(ABORT, ...), which
rolls back the statement and reaches Django as an IntegrityError saying "append-only").

Note for later migrations: SQLite's ALTER of these tables (Django rebuilds the table) drops
their triggers; such a migration must create them again (forward() below)."""
from django.db import migrations

TABLES = ("ledger_entry", "ledger_reportsnapshot")
OPS = ("UPDATE", "DELETE")


def forward(apps, schema_editor):
    if schema_editor.connection.vendor != "sqlite":
        return
    with schema_editor.connection.cursor() as cur:
        for t in TABLES:
            for op in OPS:
                cur.execute(f"DROP TRIGGER IF EXISTS {t}_no_{op.lower()}")
                cur.execute(f"CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t} "
                            f"BEGIN SELECT RAISE(ABORT, '{t} is append-only: {op} refused'); END")


def backward(apps, schema_editor):
    if schema_editor.connection.vendor != "sqlite":
        return
    with schema_editor.connection.cursor() as cur:
        for t in TABLES:
            for op in OPS:
                cur.execute(f"DROP TRIGGER IF EXISTS {t}_no_{op.lower()}")


class Migration(migrations.Migration):
    dependencies = [("ledger", "0002_append_only")]
    operations = [migrations.RunPython(forward, backward)]
