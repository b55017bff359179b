"""The `tracecode` command: one parser whose subcommands each room registers itself.

    server    serve, prune-expired, token, scripts          (tracecode.server.cli)
    clients   load, verify, reverse, history, status, recall, reverify, sanction, demo
                                                            (tracecode.clients.cli)
    leads     leads ...                                     (tracecode.leads.cli)
    console   console ...                                   (tracecode.console.cli)
    archive   archive [run | compact]                       (tracecode.archive.cli)

This module only assembles them (it is the one place that imports every room's command line);
each command's code lives in its room, behind its room's walls.
"""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from tracecode.archive import cli as archive
    from tracecode.clients import cli as clients
    from tracecode.console import cli as console
    from tracecode.leads import cli as leads
    from tracecode.server import cli as server

    p = argparse.ArgumentParser(prog="tracecode", description="Drug traceability-code verification")
    sub = p.add_subparsers(dest="command", required=True)
    server.register(sub)
    clients.register(sub)
    leads.add_parser(sub)
    console.register(sub)
    archive.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # serve sets up its own logging (server/logs.py)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
