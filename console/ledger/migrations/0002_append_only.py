"""History and submitted reports are append-only in the database too (PostgreSQL): an UPDATE or
DELETE of a ledger_entry or ledger_reportsnapshot row is refused by a trigger, whoever sends it.
On SQLite (the embedded default) the same rule is 0003."""
from django.db import migrations

TABLES = ("ledger_entry", "ledger_reportsnapshot")

FORWARD = """
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$ LANGUAGE plpgsql;
""" + "".join(f"""
CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t}
  FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
""" for t in TABLES)

BACKWARD = "".join(f"DROP TRIGGER IF EXISTS {t}_append_only ON {t};" for t in TABLES) + \
    "DROP FUNCTION IF EXISTS ledger_append_only();"


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:  # no parameters: the % of RAISE stay as they are
            cur.execute(FORWARD)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        with schema_editor.connection.cursor() as cur:
            cur.execute(BACKWARD)


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]
    operations = [migrations.RunPython(forward, backward)]
