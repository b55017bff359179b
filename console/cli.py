"""`tracecode console ...`: a thin dispatcher to the console's Django management commands
(console/ledger/management/commands/; each parses its own arguments, `tracecode console NAME -h`).

    tracecode console [serve]      migrate, then serve the web console (waitress) with the
                                   sanction retry loop; SQLite in ./tracecode-console-data unless
                                   TRACECODE_CONSOLE_DATABASE_URL says otherwise
    tracecode console consume      the audit feed's consumer (LIVE leads), over gRPC
    tracecode console retry        deliver owed sanction calls once
    tracecode console metrics      the models' effectiveness as Prometheus gauges (127.0.0.1:9466)
    tracecode console user NAME --role inspector|supervisor|auditor [--password-file F]
    tracecode console import-leads LEADS [EVIDENCE]
    tracecode console import-batch FILE --source NATIONAL --batch 第一批 --date 2024-12-03
    tracecode console import-sites FILE
    tracecode console conclusions [--out F]    concluded engine leads, for `tracecode leads backtest`
    tracecode console models-config [--out F]  the adopted models' configuration (TOML)
    tracecode console manage ARGS  Django's manage.py (migrate, createsuperuser, ...)

`register(subparsers)` adds `console` to the top-level `tracecode` parser; `main(argv)` runs it.

May import: the standard library; Django once a command runs (the console extra).
"""
from __future__ import annotations

import argparse
import os
import sys

# The commands `tracecode console` offers, by their command-line name (the module replaces - by _).
COMMANDS = {
    "serve": "serve the web console (the default)",
    "consume": "consume the server's audit feed into LIVE leads",
    "retry": "deliver owed sanction calls now",
    "metrics": "serve the models' effectiveness as Prometheus gauges (/metrics)",
    "user": "create or reset a console user",
    "import-leads": "import the leads engine's leads (+ evidence) files",
    "import-batch": "import a handed-down batch or complaints (CSV/XLSX)",
    "import-sites": "import the site registry",
    "conclusions": "export the concluded engine leads for `tracecode leads backtest`",
    "models-config": "write the adopted models' configuration for the leads engine",
    "manage": "Django's management commands (migrate, createsuperuser, ...)",
}
APP = "tracecode.console.ledger"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tracecode console [COMMAND] [ARGS]  (no COMMAND: serve)", "",
             "the leads ledger console (线索台账)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`tracecode console COMMAND -h` for a command's arguments."]
    return "\n".join(lines)


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tracecode.console.settings")
    try:
        import django
    except ImportError:
        sys.exit("the console needs its extra: pip install 'tracecode[console]'")
    django.setup()


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # sys.exit("message")
    return 1


def run_command(name: str, args: list[str]) -> int:
    """Run one of the ledger app's commands as from a command line; its exit code."""
    from django.core.management import load_command_class
    command = load_command_class(APP, name.replace("-", "_"))
    try:
        # Parses args (prog "tracecode console NAME"), runs it; a CommandError is printed without
        # a traceback and becomes SystemExit(its returncode), as with manage.py.
        command.run_from_argv(["tracecode console", name, *args])
    except SystemExit as exc:
        return _exit_code(exc)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # `tracecode console [--listen ...]` serves
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(usage())
        return 0
    if name not in COMMANDS:
        print(f"tracecode console: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    _django()
    if name == "manage":
        from django.core.management import execute_from_command_line
        try:
            execute_from_command_line(["tracecode console manage", *rest])
        except SystemExit as exc:
            return _exit_code(exc)
        return 0
    return run_command(name, rest)


def _run(args: argparse.Namespace) -> int:
    return main(args.rest)


def register(subparsers) -> argparse.ArgumentParser:
    """Add `console` to the top-level `tracecode` parser's subcommands. Every argument after
    `console` is the console's own (prefix_chars: none reach the top-level parser)."""
    k = subparsers.add_parser("console", add_help=False, prefix_chars="\x00",
                              help="the leads ledger web console (`tracecode console -h`)")
    k.add_argument("rest", nargs=argparse.REMAINDER)
    k.set_defaults(func=_run)
    return k


if __name__ == "__main__":
    sys.exit(main())
