"""`tracecode console ...`: run the ledger console and its workers.

    tracecode console [serve]      migrate, then serve the web console (waitress) with the
                                   sanction retry loop; SQLite in ./tracecode-console-data unless
                                   TRACECODE_CONSOLE_DATABASE_URL says otherwise
    tracecode console consume      the audit stream consumer (LIVE leads)
    tracecode console retry        deliver owed sanction calls once
    tracecode console user NAME --role inspector|supervisor|auditor [--password-file F]
    tracecode console import-leads LEADS [EVIDENCE]
    tracecode console import-batch FILE --source NATIONAL --batch 第一批 --date 2024-12-03
    tracecode console import-sites FILE
    tracecode console manage ARGS  Django's manage.py (migrate, createsuperuser, ...)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import date


def _django():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tracecode.console.settings")
    try:
        import django
    except ImportError:
        sys.exit("the console needs its extra: pip install 'tracecode[console]'")
    django.setup()


def _migrate() -> None:
    from django.core.management import call_command
    call_command("migrate", interactive=False, verbosity=0)


def cmd_serve(args) -> int:
    _django()
    if not args.no_migrate:
        _migrate()
    from django.conf import settings
    from waitress import create_server

    from tracecode.console.ledger.gateway import RetryLoop
    from tracecode.console.wsgi import application

    host, _, port = args.listen.rpartition(":")
    server = create_server(application, host=host or "127.0.0.1", port=int(port), threads=args.threads)
    retry = RetryLoop(settings.TRACECODE_RETRY_INTERVAL_S)
    retry.start()
    print(f"tracecode console on http://{server.effective_host}:{server.effective_port}/ "
          f"(database {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}, "
          f"service {settings.TRACECODE_SERVER})", flush=True)

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
    return 0


def cmd_consume(args) -> int:
    _django()
    from tracecode.console.ledger.stream import AuditConsumer, ConsumerConfig
    consumer = AuditConsumer(ConsumerConfig(
        redis_url=args.redis_url, prefix=args.prefix, group=args.group, consumer=args.consumer or "",
        count=args.count, max_rate=args.max_rate, metrics_port=args.metrics_port, cluster=args.redis_cluster))
    if args.from_start:
        consumer.replay_from_start()

    def stop(*_):
        consumer.stopping.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"consuming audit streams of {args.prefix} as {consumer.cfg.name} (group {args.group})", flush=True)
    consumer.run()
    return 0


def cmd_retry(args) -> int:
    _django()
    from tracecode.console.ledger.gateway import retry_pending
    print(f"delivered {retry_pending()} owed sanction calls")
    return 0


def cmd_user(args) -> int:
    _django()
    _migrate()
    from tracecode.console.ledger.roles import make_user
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as fh:
            password = fh.read().strip()
    else:
        import getpass
        password = getpass.getpass(f"password for {args.name}: ")
    make_user(args.name, password, args.role)
    print(f"user {args.name}: {args.role}")
    return 0


def _print_report(rep) -> int:
    print(f"leads created {rep.leads_created}, extended {rep.leads_extended}, evidence added "
          f"{rep.evidence_added}, unchanged {rep.unchanged}, problems {len(rep.problems)}")
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in rep.problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if rep.problems else 0


def cmd_import_leads(args) -> int:
    _django()
    from tracecode.console.ledger.intake import import_engine
    return _print_report(import_engine(args.leads, args.evidence))


def cmd_import_batch(args) -> int:
    _django()
    from tracecode.console.ledger.intake import import_batch
    from tracecode.console.ledger.rules import Source
    try:
        rep = import_batch(args.file, Source(args.source), args.batch, date.fromisoformat(args.date))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _print_report(rep)


def cmd_import_sites(args) -> int:
    _django()
    from tracecode.console.ledger.intake import import_sites
    return _print_report(import_sites(args.file))


def cmd_manage(args) -> int:
    _django()
    from django.core.management import execute_from_command_line
    execute_from_command_line(["tracecode console manage", *args.rest])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracecode console", description="the leads ledger console (线索台账)")
    sub = p.add_subparsers(dest="what")
    s = sub.add_parser("serve", help="serve the web console (default)")
    s.add_argument("--listen", default=os.environ.get("TRACECODE_CONSOLE_LISTEN", "127.0.0.1:8000"))
    s.add_argument("--threads", type=int, default=8)
    s.add_argument("--no-migrate", action="store_true", help="do not apply migrations first")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("consume", help="consume the settlement audit streams into LIVE leads")
    c.add_argument("--redis-url", default=os.environ.get("TRACECODE_CONSOLE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    c.add_argument("--redis-cluster", action="store_true", help="--redis-url is a node of a Redis Cluster")
    c.add_argument("--prefix", default=os.environ.get("TRACECODE_KEY_PREFIX", "tc"), help="the server's key prefix")
    c.add_argument("--group", default="ledger-console")
    c.add_argument("--consumer", default=None, help="consumer name (default: host name; keep it stable)")
    c.add_argument("--count", type=int, default=200)
    c.add_argument("--max-rate", type=float, default=0.0, help="entries per second at most (0: no cap)")
    c.add_argument("--metrics-port", type=int, default=int(os.environ.get("TRACECODE_CONSOLE_METRICS_PORT", "9465")))
    c.add_argument("--from-start", action="store_true", help="move the group to the start of the streams first (replay)")
    c.set_defaults(func=cmd_consume)
    r = sub.add_parser("retry", help="deliver owed sanction calls now")
    r.set_defaults(func=cmd_retry)
    u = sub.add_parser("user", help="create or reset a console user")
    u.add_argument("name")
    u.add_argument("--role", required=True, choices=["inspector", "supervisor", "auditor"])
    u.add_argument("--password-file")
    u.set_defaults(func=cmd_user)
    i = sub.add_parser("import-leads", help="import the leads engine's leads (+ evidence) files")
    i.add_argument("leads")
    i.add_argument("evidence", nargs="?")
    i.set_defaults(func=cmd_import_leads)
    b = sub.add_parser("import-batch", help="import a handed-down batch or complaints (CSV/XLSX)")
    b.add_argument("file")
    b.add_argument("--source", required=True, choices=["NATIONAL", "PROVINCIAL", "COMPLAINT"])
    b.add_argument("--batch", required=True, help="batch number, e.g. 第一批")
    b.add_argument("--date", required=True, help="date received, YYYY-MM-DD")
    b.set_defaults(func=cmd_import_batch)
    t = sub.add_parser("import-sites", help="import the site registry")
    t.add_argument("file")
    t.set_defaults(func=cmd_import_sites)
    m = sub.add_parser("manage", help="Django management commands")
    m.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(func=cmd_manage)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # `tracecode console [--listen ...]` serves
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
