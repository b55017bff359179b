"""Issue 28: Alert (a counter's alerts for its pharmacy to answer, alerts.py), and the public code
query's rate-limit windows and counts (public.py). New tables only: the append-only triggers of
0002/0003 are untouched."""

import django.db.models.deletion
import uuid
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("ledger", "0006_model_config"),
    ]

    operations = [
        migrations.CreateModel(
            name='PublicQueryCount',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('outcome', models.CharField(max_length=16, unique=True)),
                ('count', models.BigIntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name='PublicQueryWindow',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('address', models.CharField(max_length=64, unique=True)),
                ('window_start', models.DateTimeField()),
                ('count', models.IntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name='Alert',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.CharField(max_length=300, unique=True)),
                ('public_id', models.UUIDField(default=uuid.uuid4, unique=True)),
                ('site_id', models.CharField(db_index=True, max_length=64)),
                ('kind', models.CharField(max_length=12)),
                ('verdict', models.CharField(blank=True, default='', max_length=32)),
                ('detail', models.TextField(blank=True, default='')),
                ('canonical_code', models.CharField(blank=True, default='', max_length=128)),
                ('settlement_id', models.CharField(blank=True, default='', max_length=128)),
                ('line_index', models.IntegerField(default=-1)),
                ('raised_at', models.DateTimeField(db_index=True)),
                ('received_at', models.DateTimeField(auto_now_add=True)),
                ('cause', models.CharField(blank=True, default='', max_length=16)),
                ('note', models.TextField(blank=True, default='')),
                ('answered_at', models.DateTimeField(db_index=True, null=True)),
                ('answered_by', models.CharField(blank=True, default='', max_length=80)),
                ('accepted_by', models.CharField(blank=True, default='', max_length=150)),
                ('accepted_at', models.DateTimeField(null=True)),
                ('lead', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT,
                                           related_name='alerts', to='ledger.lead')),
            ],
            options={
                'indexes': [models.Index(fields=['site_id', 'raised_at'], name='ledger_aler_site_id_74e54d_idx')],
            },
        ),
    ]
