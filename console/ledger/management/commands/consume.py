"""`tracecode console consume`: the audit feed's consumer (LIVE leads), over gRPC to the
tracecode server (TRACECODE_CONSOLE_SERVER, or --server), with an admin identity.

May import: Django and the ledger app."""
from __future__ import annotations

import os
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "consume the server's audit feed into LIVE leads"
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        env = os.environ.get
        parser.add_argument("--server", default=settings.TRACECODE_SERVER,
                            help="the tracecode server, host:port (default TRACECODE_CONSOLE_SERVER)")
        parser.add_argument("--tls-ca", default=settings.TRACECODE_TLS_CA,
                            help="CA certificate (PEM) of the server: connect with TLS (TRACECODE_CONSOLE_TLS_CA)")
        parser.add_argument("--tls-cert", default=settings.TRACECODE_TLS_CERT,
                            help="client certificate (PEM) naming admin:<name> (auth = mtls)")
        parser.add_argument("--tls-key", default=settings.TRACECODE_TLS_KEY, help="private key of --tls-cert")
        parser.add_argument("--token-file", default=settings.TRACECODE_TOKEN_FILE,
                            help="file holding an admin bearer token (auth = token; TRACECODE_CONSOLE_TOKEN_FILE)")
        parser.add_argument("--group", default="ledger-console")
        parser.add_argument("--consumer", default=None, help="consumer name (default: host name; keep it stable)")
        parser.add_argument("--count", type=int, default=200, help="events per batch at most")
        parser.add_argument("--claim-idle-ms", type=int, default=60_000,
                            help="take over events another consumer left unacknowledged this long")
        parser.add_argument("--max-rate", type=float, default=0.0, help="events per second at most (0: no cap)")
        parser.add_argument("--metrics-port", type=int, default=int(env("TRACECODE_CONSOLE_METRICS_PORT", "9465")))
        parser.add_argument("--from-start", action="store_true",
                            help="move the group to the start of the feed first (replay)")

    def handle(self, *args, **o):
        import grpc

        from tracecode.console.ledger.stream import AuditConsumer, ConsumerConfig
        try:
            consumer = AuditConsumer(ConsumerConfig(
                server=o["server"], group=o["group"], consumer=o["consumer"] or "", count=o["count"],
                claim_idle_ms=o["claim_idle_ms"], max_rate=o["max_rate"], metrics_port=o["metrics_port"],
                tls_ca=o["tls_ca"] or "", tls_cert=o["tls_cert"] or "", tls_key=o["tls_key"] or "",
                token_file=o["token_file"] or ""))
        except (OSError, ValueError) as exc:  # an unreadable certificate or token file, a half TLS pair
            raise CommandError(str(exc), returncode=2) from None
        if o["from_start"]:
            try:
                consumer.replay_from_start()
            except grpc.RpcError as exc:
                raise CommandError(f"replay refused: {exc.code().name}: {exc.details()}", returncode=2) from None

        def stop(*_):
            consumer.stopping.set()
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"consuming the audit feed of {o['server']} as {consumer.cfg.name} (group {o['group']})")
        self.stdout.flush()
        consumer.run()
