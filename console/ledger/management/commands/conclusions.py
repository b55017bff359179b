"""`tracecode console conclusions [--out FILE]`: every concluded engine lead with its finding
(CONFIRMED / UNFOUNDED), the `--conclusions` input of `tracecode leads backtest`.

May import: Django and the ledger app."""
from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "export the ledger's conclusions for tracecode leads backtest"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("--out", help="file to write (default: standard output)")

    def handle(self, *args, out: str | None = None, **options):
        from tracecode.console.ledger.modelconf import conclusions_csv
        text = conclusions_csv()
        if not out:
            sys.stdout.write(text)
            return
        tmp = f"{out}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, out)  # whole or not at all: a backtest never reads half an export
        self.stderr.write(f"{text.count(chr(10)) - 1} concluded leads in {out}")
