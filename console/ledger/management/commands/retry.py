"""`tracecode console retry`: deliver the owed sanction calls once.

May import: Django and the ledger app."""
from __future__ import annotations

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "deliver owed sanction calls now"
    requires_system_checks: list[str] = []

    def handle(self, *args, **options):
        from tracecode.console.ledger.gateway import retry_pending
        self.stdout.write(f"delivered {retry_pending()} owed sanction calls")
