from django.apps import AppConfig


class LedgerConfig(AppConfig):
    name = "tracecode.console.ledger"
    label = "ledger"
    verbose_name = "线索台账"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.db.models.signals import post_migrate

        from .roles import ensure_roles
        post_migrate.connect(lambda **kw: ensure_roles(), sender=self, weak=False)
