"""ModelConfig (issue 27): the models' configurations, proposed and adopted by two people; two new permissions."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('ledger', '0005_lead_model_status'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterModelOptions(
            name='lead',
            options={'permissions': [(p, p) for p in (
                'view_all_leads', 'work_lead', 'assign_lead', 'review_lead', 'record_action', 'propose_sanction',
                'approve_sanction', 'import_leads', 'submit_report', 'view_report', 'propose_model_config',
                'approve_model_config')]},
        ),
        migrations.CreateModel(
            name='ModelConfig',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('toml', models.TextField(blank=True, default='')),
                ('sha256', models.CharField(max_length=64)),
                ('report', models.TextField(blank=True, default='')),
                ('reason', models.TextField()),
                ('state', models.CharField(db_index=True, default='PROPOSED', max_length=12)),
                ('proposed_at', models.DateTimeField(auto_now_add=True)),
                ('decided_at', models.DateTimeField(null=True)),
                ('decision_note', models.TextField(blank=True, default='')),
                ('superseded_at', models.DateTimeField(null=True)),
                ('decided_by', models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT,
                                                 related_name='+', to=settings.AUTH_USER_MODEL)),
                ('proposed_by', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='+',
                                                  to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'constraints': [models.UniqueConstraint(condition=models.Q(('state', 'ADOPTED')), fields=('state',),
                                                        name='one_adopted_model_config')],
            },
        ),
    ]
