"""`tracecode console [serve]`: migrate, then serve the web console (waitress) with the sanction
retry loop; SQLite in ./tracecode-console-data unless TRACECODE_CONSOLE_DATABASE_URL says otherwise.

May import: Django, waitress and the ledger app."""
from __future__ import annotations

import os
import signal

from django.conf import settings
from django.core.management.base import BaseCommand

from ._common import migrate


class Command(BaseCommand):
    help = "serve the web console (the default command)"
    requires_system_checks: list[str] = []  # started as a service: the checks are the tests' job

    def add_arguments(self, parser):
        parser.add_argument("--listen", default=os.environ.get("TRACECODE_CONSOLE_LISTEN", "127.0.0.1:8000"))
        parser.add_argument("--threads", type=int, default=8)
        parser.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")

    def handle(self, *args, listen: str, threads: int, no_migrate: bool, **options):
        if not no_migrate:
            migrate()
        from waitress import create_server

        from tracecode.console.ledger.gateway import RetryLoop
        from tracecode.console.wsgi import application

        host, _, port = listen.rpartition(":")
        server = create_server(application, host=host or "127.0.0.1", port=int(port), threads=threads)
        retry = RetryLoop(settings.TRACECODE_RETRY_INTERVAL_S)
        retry.start()
        self.stdout.write(f"tracecode console on http://{server.effective_host}:{server.effective_port}/ "
                          f"(database {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
                          f"service {settings.TRACECODE_SERVER})")
        self.stdout.flush()

        def stop(*_):
            retry.stopping.set()
            server.close()
        signal.signal(signal.SIGTERM, stop)
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            retry.stopping.set()
