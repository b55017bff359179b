"""`tracecode console import-sites FILE`: the site registry, all or nothing.

May import: Django and the ledger app."""
from __future__ import annotations

from django.core.management.base import BaseCommand

from ._common import exit_with, print_report


class Command(BaseCommand):
    help = "import the site registry"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("file")

    def handle(self, *args, file: str, **options):
        from tracecode.console.ledger.intake import import_sites
        exit_with(print_report(import_sites(file), self.stdout, self.stderr))
