"""`tracecode console import-batch FILE --source S --batch B --date D`: a handed-down batch or
complaints (CSV/XLSX), all or nothing.

May import: Django and the ledger app."""
from __future__ import annotations

from datetime import date

from django.core.management.base import BaseCommand

from ._common import exit_with, print_report


class Command(BaseCommand):
    help = "import a handed-down batch or complaints (CSV/XLSX)"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--source", required=True, choices=["NATIONAL", "PROVINCIAL", "COMPLAINT"])
        parser.add_argument("--batch", required=True, help="batch number, e.g. 第一批")
        parser.add_argument("--date", required=True, help="date received, YYYY-MM-DD")

    def handle(self, *args, **o):
        from tracecode.console.ledger.intake import import_batch
        from tracecode.console.ledger.rules import Source
        try:
            rep = import_batch(o["file"], Source(o["source"]), o["batch"], _date(o["date"]))
        except ValueError as exc:
            self.stderr.write(f"error: {exc}")
            exit_with(2)
            return
        exit_with(print_report(rep, self.stdout, self.stderr))


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--date: {text!r} is not a date YYYY-MM-DD") from None
