"""`tracecode console models-config [--out FILE]`: the models' configuration the ledger adopted
(two people: proposed, then approved by another supervisor), for the leads engine's next run
(`tracecode leads ... --config FILE`). Exit 3 with nothing written when none was adopted yet
(the engine then runs its built-in configuration).

May import: Django and the ledger app."""
from __future__ import annotations

import os
import sys

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "write the adopted models' configuration (TOML) for the leads engine"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("--out", help="file to write (default: standard output)")

    def handle(self, *args, out: str | None = None, **options):
        from tracecode.console.ledger.modelconf import adopted
        cfg = adopted()
        if cfg is None:
            self.stderr.write("no models' configuration adopted yet: the engine's built-in one applies")
            raise SystemExit(3)
        if not out:
            sys.stdout.write(cfg.toml)
            return
        tmp = f"{out}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(cfg.toml)
        os.replace(tmp, out)
        self.stderr.write(f"configuration #{cfg.pk} (sha256 {cfg.sha256[:12]}) in {out}")
