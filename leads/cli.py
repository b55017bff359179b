"""`tracecode leads FILE... --issuance FILE... [--sites FILE] --out DIR`: the subcommand.

Registered by clients/cli.py with one call (add_parser); everything heavy is imported when the
command runs, so `tracecode --help` stays fast and works without the leads extra.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("leads", help="suspicious leads (疑点线索) from settlement history: the big-data models")
    p.add_argument("files", nargs="+", help="settlement exports (CSV, JSONL, .gz, Parquet)")
    p.add_argument("--issuance", nargs="+", required=True, help="issuance files, in load order")
    p.add_argument("--sites", help="site registry: site_id, site_kind, region, name")
    p.add_argument("--out", required=True, help="output directory (leads, evidence, errors, network.png)")
    p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb",
                   help="duckdb: embedded, nothing to start (default); spark: Apache Spark")
    p.add_argument("--spark-master", default="local[2]", help="Spark master URL (default local[2])")
    p.add_argument("--pseudonym-key", help="key file of the insured pseudonyms (raw insured ids in the input)")
    p.add_argument("--insured-pseudonymised", action="store_true",
                   help="the input's insured_id values are pseudonyms already: use them as they are")
    p.add_argument("--config", help="TOML file of model thresholds and risk cut-offs (docs/leads.md)")
    p.add_argument("--server-config", help="the server's TOML config (timezone, code prefixes, limits), "
                                           "so verdicts are judged as that server judges them")
    p.add_argument("--lines", action="store_true", help="also write every line's verdict (lines.csv/.parquet)")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one, removed after)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tracecode.server import config as server_config
    from tracecode.server.pseudonym import PseudonymKeyError, Pseudonymizer

    from . import config
    from .inputs import Pseudonyms
    from .run import Options, run
    if args.pseudonym_key and args.insured_pseudonymised:
        print("error: --pseudonym-key and --insured-pseudonymised exclude each other", file=sys.stderr)
        return 2
    try:
        pseudo = Pseudonyms(Pseudonymizer.from_file(args.pseudonym_key) if args.pseudonym_key else None,
                            args.insured_pseudonymised)
        cfg = config.load(args.config)
        scfg = server_config.load(config_file=args.server_config)
    except (PseudonymKeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        res = run(Options(files=args.files, issuance=args.issuance, out=args.out, sites=args.sites,
                          engine=args.engine, spark_master=args.spark_master, pseudonyms=pseudo, config=cfg,
                          server_config=scfg, lines_out=args.lines, progress=not args.quiet,
                          workdir=args.workdir))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flagged = sum(n for v, n in res.verdicts.items() if v != "OK")
    print(f"{res.lines} lines, {flagged} flagged, {res.errors} errors; {res.leads} leads, "
          f"{res.evidence} evidence lines in {args.out}")
    return 0
