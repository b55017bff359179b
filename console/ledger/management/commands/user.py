"""`tracecode console user NAME --role ROLE [--password-file F]`: create or reset a console user
(the password validators apply, as on the web).

May import: Django and the ledger app."""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand

from ._common import exit_with, migrate


class Command(BaseCommand):
    help = "create or reset a console user"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--role", required=True, choices=["inspector", "supervisor", "auditor"])
        parser.add_argument("--password-file")

    def handle(self, *args, name: str, role: str, password_file: str | None, **options):
        migrate()
        from tracecode.console.ledger.roles import make_user
        if password_file:
            with open(password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        else:
            import getpass
            password = getpass.getpass(f"password for {name}: ")
        try:
            make_user(name, password, role)
        except ValidationError as exc:  # AUTH_PASSWORD_VALIDATORS, as on the web
            for message in exc.messages:
                self.stderr.write(f"error: password refused: {message}")
            exit_with(2)
            return
        self.stdout.write(f"user {name}: {role}")
