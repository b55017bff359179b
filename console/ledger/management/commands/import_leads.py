"""`tracecode console import-leads LEADS [EVIDENCE]`: the leads engine's files, all or nothing.

May import: Django and the ledger app."""
from __future__ import annotations

from django.core.management.base import BaseCommand

from ._common import exit_with, print_report


class Command(BaseCommand):
    help = "import the leads engine's leads (+ evidence) files"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("leads")
        parser.add_argument("evidence", nargs="?")

    def handle(self, *args, leads: str, evidence: str | None, **options):
        from tracecode.console.ledger.intake import import_engine
        exit_with(print_report(import_engine(leads, evidence), self.stdout, self.stderr))
