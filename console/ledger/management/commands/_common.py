"""What the console's commands share: the import report's printing and exit codes.

May import: Django and the ledger app."""
from __future__ import annotations

import sys

from django.core.management import call_command


def migrate() -> None:
    call_command("migrate", interactive=False, verbosity=0)


def print_report(rep, stdout=None, stderr=None) -> int:
    """An import's outcome; 1 when it had problems (then nothing was imported: all-or-nothing)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    if rep.refused:  # all-or-nothing per file
        out.write(f"nothing imported: {len(rep.problems)} problems (correct the file and import it again)\n")
    else:
        out.write(f"leads created {rep.leads_created}, extended {rep.leads_extended}, evidence added "
                  f"{rep.evidence_added}, unchanged {rep.unchanged}\n")
    for w in rep.warnings:
        err.write(f"warning: {w}\n")
    for p in rep.problems:
        err.write(f"error: {p}\n")
    return 1 if rep.problems else 0


def exit_with(code: int) -> None:
    """End the command with an exit code (Django's commands have none of their own): the
    dispatcher (console/cli.py) returns it, a shell sees it."""
    if code:
        raise SystemExit(code)
