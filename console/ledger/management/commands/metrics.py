"""`tracecode console metrics [--port 9466] [--addr 127.0.0.1]`: the models' effectiveness
(effect.py), pharmacies' unanswered alerts (alerts.py) and the public query's counts (public.py)
as Prometheus metrics on /metrics, read from the ledger at each scrape.

A process of its own rather than a /metrics page of the web console: every page of the console
is behind its login, and a scraper has none; like the consumer's /metrics it listens on the
loopback address unless told otherwise.

May import: Django, prometheus_client and the ledger app."""
from __future__ import annotations

import os
import threading

from django.core.management.base import BaseCommand


def serve(port: int, addr: str):
    """Start the exporter; (server, thread) as prometheus_client returns them (port 0: any free port)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from tracecode.console.ledger import alerts, public
    from tracecode.console.ledger.effect import Collector
    registry = CollectorRegistry()
    registry.register(Collector())
    # Pharmacies' unanswered alerts by age, and the public query's counts (issue 28).
    registry.register(alerts.Collector())
    registry.register(public.Collector())
    return start_http_server(port, addr=addr, registry=registry)


class Command(BaseCommand):
    help = "serve the models' effectiveness as Prometheus gauges"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("TRACECODE_CONSOLE_EFFECT_PORT", "9466")))
        parser.add_argument("--addr", default="127.0.0.1")

    def handle(self, *args, **options):
        server, _ = serve(options["port"], options["addr"])
        self.stdout.write(f"model effectiveness on http://{options['addr']}:{server.server_port}/metrics")
        self.stdout.flush()
        threading.Event().wait()  # until the process is stopped
