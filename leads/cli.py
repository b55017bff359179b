"""`tracecode leads FILE... --issuance FILE... [--sites FILE] --out DIR`: the subcommand, and
`tracecode leads backtest FILE... --config CANDIDATE.toml [--baseline CURRENT.toml]
[--conclusions FILE] ...`: a candidate configuration beside the current one (backtest.py). The
word `backtest` as the first positional selects it (a settlement file of that name is given as
`./backtest`).

Registered by the tracecode command (tracecode/cli.py) with one call (add_parser); everything heavy is imported when the
command runs, so `tracecode --help` stays fast and works without the leads extra.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("leads", help="suspicious leads (疑点线索) from settlement history: the big-data models")
    p.add_argument("files", nargs="*", help="settlement exports (CSV, JSONL, .gz, Parquet)")
    p.add_argument("--archive", help="read the settlement lines from tracecode's audit archive (a path, file:// "
                                     "or s3:// URI; docs/archive.md) instead of, or besides, the exports")
    p.add_argument("--from", dest="day_from", help="with --archive: first settlement date, YYYY-MM-DD")
    p.add_argument("--until", dest="day_until", help="with --archive: last settlement date, YYYY-MM-DD")
    p.add_argument("--issuance", nargs="+", default=[],
                   help="issuance files, in load order (resuming a --state: the records since its last run)")
    p.add_argument("--sites", help="site registry: site_id, site_kind, region, name")
    p.add_argument("--receipts", nargs="+", default=[],
                   help="receiving-check records (site_id, code[, received_at, delivery_id, ...]): the UNRECEIVED model")
    p.add_argument("--out", required=True, help="output directory (leads, evidence, errors, network.png)")
    p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb",
                   help="duckdb: embedded, nothing to start (default); spark: Apache Spark")
    p.add_argument("--spark-master", default="local[2]", help="Spark master URL (default local[2])")
    p.add_argument("--pseudonym-key", help="key file of the insured pseudonyms (raw insured ids in the input)")
    p.add_argument("--insured-pseudonymised", action="store_true",
                   help="the input's insured_id values are pseudonyms already: use them as they are")
    p.add_argument("--config", help="TOML file of model thresholds and risk cut-offs (docs/leads.md); "
                                    "with backtest: the candidate")
    p.add_argument("--baseline", help="backtest: the current configuration (TOML; default: the built-in one)")
    p.add_argument("--conclusions", help="backtest: the ledger's conclusions (tracecode console conclusions)")
    p.add_argument("--server-config", help="the server's TOML config (timezone, code prefixes, limits), "
                                           "so verdicts are judged as that server judges them")
    p.add_argument("--lines", action="store_true", help="also write every line's verdict (lines.csv/.parquet)")
    p.add_argument("--state", metavar="DIR",
                   help="incremental runs: resume from the state a previous run saved in DIR (if any), judge "
                        "the given files as the days after it, and save the state there (docs/leads.md)")
    p.add_argument("--workdir", help="scratch directory (default: a temporary one, removed after)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tracecode.clients.files import InputFileError
    from tracecode.server import config as server_config
    from tracecode.rules.pseudonym import PseudonymKeyError, Pseudonymizer

    from . import config
    from .inputs import Pseudonyms
    from .run import Options, run
    backtest = bool(args.files) and args.files[0] == "backtest"
    if backtest:
        args.files = args.files[1:]
        if not args.config:
            print("error: backtest: give the candidate configuration with --config", file=sys.stderr)
            return 2
    elif args.baseline or args.conclusions:
        print("error: --baseline and --conclusions are backtest switches (tracecode leads backtest ...)",
              file=sys.stderr)
        return 2
    if not args.files and not args.archive:
        print("error: give settlement exports (FILE...) or --archive URI", file=sys.stderr)
        return 2
    if not args.issuance and not args.state:
        print("error: give the issuance files (--issuance FILE...)", file=sys.stderr)
        return 2
    if args.archive and args.files:
        print("error: --archive reads the history from the archive: give no export files with it", file=sys.stderr)
        return 2
    if (args.day_from or args.day_until) and not args.archive:
        print("error: --from/--until select archive partitions: they need --archive", file=sys.stderr)
        return 2
    if args.archive and args.pseudonym_key:
        print("error: the archive holds pseudonyms only: --pseudonym-key is not needed with --archive", file=sys.stderr)
        return 2
    if args.pseudonym_key and args.insured_pseudonymised:
        print("error: --pseudonym-key and --insured-pseudonymised exclude each other", file=sys.stderr)
        return 2
    try:
        pseudo = Pseudonyms(Pseudonymizer.from_file(args.pseudonym_key) if args.pseudonym_key else None,
                            args.insured_pseudonymised)
        cfg = config.load(args.config)
        baseline = config.load(args.baseline) if backtest else None
        scfg = server_config.load(config_file=args.server_config)
    except (PseudonymKeyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = list(args.files)
    receipts = list(args.receipts or [])
    if args.archive:
        import os
        import tempfile

        from .archive import export_from_archive, receipts_from_archive
        scratch = args.workdir or tempfile.mkdtemp(prefix="tracecode-leads-archive-")
        os.makedirs(scratch, exist_ok=True)
        path = os.path.join(scratch, "archive-export.parquet")
        received = os.path.join(scratch, "archive-receipts.parquet")
        try:
            n = export_from_archive(args.archive, path, args.day_from, args.day_until, args.engine, args.spark_master)
            n_received = receipts_from_archive(args.archive, received, args.day_until)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(f"archive {args.archive}: {n} settlement lines, {n_received} receipts", file=sys.stderr)
        files = [path]
        # The receiving check's records are the UNRECEIVED model's receipts (full runs only: an
        # incremental state does not carry receipts, run.py).
        if n_received and not args.state:
            receipts = [*receipts, received]
        elif n_received and not args.quiet:
            print("note: --state: the archive's receipts are left out (UNRECEIVED runs in full runs only)",
                  file=sys.stderr)
        pseudo = Pseudonyms(None, True)  # the archive holds pseudonyms only
    opts = Options(files=files, issuance=args.issuance, out=args.out, sites=args.sites, receipts=receipts,
                   engine=args.engine, spark_master=args.spark_master, pseudonyms=pseudo, config=cfg,
                   server_config=scfg, lines_out=args.lines, progress=not args.quiet, workdir=args.workdir,
                   state=args.state)
    if backtest:
        if args.state:
            print("error: a backtest runs the history in full under each configuration: give no --state", file=sys.stderr)
            return 2
        return _backtest(opts, baseline, cfg, args.conclusions)
    try:
        res = run(opts)
    # One line naming the file or the switch, no traceback: an input that cannot be read
    # (InputFileError, nothing written), an --out that cannot be written (OSError).
    except (ValueError, InputFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flagged = sum(n for v, n in res.verdicts.items() if v != "OK")
    print(f"{res.lines} lines, {flagged} flagged, {res.errors} errors; {res.leads} leads, "
          f"{res.evidence} evidence lines in {args.out}")
    return 0


def _backtest(opts, baseline, candidate, conclusions_path: str | None) -> int:
    from tracecode.clients.files import InputFileError

    from .backtest import describe, read_conclusions, run_backtest
    try:
        ignored: dict[str, int] = {}
        conclusions = read_conclusions(conclusions_path, ignored) if conclusions_path else []
        for model, n in sorted(ignored.items()):
            print(f"warning: {conclusions_path}: {n} conclusion(s) of model {model[:40]!r}, which this engine does "
                  "not have: not compared", file=sys.stderr)
        reports = run_backtest(opts, baseline, candidate, conclusions)
    except (ValueError, InputFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(reports))
    print(f"report: {opts.out}/backtest.csv, backtest.json")
    return 0
