"""Lead.model_status: the model version's status (试点 / 在用 / 停用) when the lead was opened.
Existing leads came from models in use, so they read PRODUCTION (the default)."""
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("ledger", "0004_login_throttle"),
    ]

    operations = [
        migrations.AddField(
            model_name="lead",
            name="model_status",
            field=models.CharField(db_index=True, default="PRODUCTION", max_length=12),
        ),
    ]
