"""The `tracecode` command line: serve, load, verify, reverse, history, status, recall, demo."""
from __future__ import annotations

import argparse
import json
import os
import logging
import sys
import time

import grpc

from tracecode.v1 import verification_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"


def _print_results(resp) -> None:
    flag = "replayed" if resp.replayed else ("recorded" if resp.recorded else "NOT recorded")
    print(f"settlement {resp.settlement_id} at site {resp.site_id}: {flag}")
    for r in resp.results:
        verdict = pb.Verdict.Name(r.verdict)
        print(f"  line {r.line_index + 1}: {verdict:<20} {r.canonical_code or '-'}"
              + (f"  ({r.reason})" if r.reason else "")
              + (f"  units {r.units_accepted}, {r.units_remaining} left" if verdict == "OK" else ""))


def cmd_serve(args) -> int:
    from tracecode.server import config as cfg
    from tracecode.server.app import serve
    from tracecode.server.api.auth import from_config
    try:
        config = cfg.from_args(args)
        from_config(config)  # the security settings, checked before anything starts
        if config.pseudonym_key_file:  # a given key file must be usable before anything starts
            from tracecode.server.pseudonym import Pseudonymizer
            Pseudonymizer.from_file(config.pseudonym_key_file)
    except (ValueError, OSError) as exc:  # a setting wrong, missing or unreadable: say which
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def cmd_migrate_layout(args) -> int:
    from tracecode.server import config as cfg
    from tracecode.server.app import migrate_layout
    last = [0.0]

    def progress(s) -> None:
        if time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            print(f"  {s.moved} codes moved of {s.scanned} found", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        s = migrate_layout(cfg.from_args(args), progress=progress)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"migrate-layout: {s.moved} codes moved to layout 2 ({s.scanned} layout-1 records found, "
          f"{s.skipped} already moved) in {time.monotonic() - started:.1f} s")
    return 0


def cmd_prune_expired(args) -> int:
    from tracecode.server import config as cfg
    from tracecode.server.app import prune_expired
    try:
        config = cfg.from_args(args)
        started = time.monotonic()
        s = prune_expired(config, args.cutoff)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"prune-expired: {s.pruned} expired packs dropped of {s.codes} codes in {s.buckets} buckets "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def _readable_rows(path: str):
    """read_rows(path), ending with one RowError naming the file when it cannot be read (missing,
    unreadable, corrupt .gz, not UTF-8): raised inside the upload stream it would only surface as
    gRPC's anonymous "Exception iterating requests!"."""
    import csv
    from .files import ISSUANCE_FIELDS, RowError, read_rows
    line = 0
    try:
        for row in read_rows(path, ISSUANCE_FIELDS):
            line = row.line
            yield row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        yield RowError(path, line + 1 if line else 0, "-", f"cannot read the file: {exc}")


def cmd_load(args) -> int:
    from .admin import AdminClient
    client = AdminClient(args.server, **_connection(args))
    total = {"received": 0, "created": 0, "updated": 0, "unchanged": 0, "conflicts": 0, "rejected": 0}
    file_errors: list = []
    started = time.monotonic()
    for path in args.files:
        def progress(n, path=path):
            rate = n / max(time.monotonic() - started, 1e-9)
            print(f"\r{path}: {n} records sent ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
        resp = client.upsert(_readable_rows(path), replace=args.replace, source=path,
                             progress=progress, on_error=file_errors.append)
        print(file=sys.stderr)
        for k in total:
            total[k] += getattr(resp, k)
        for e in resp.errors:
            print(f"{e.source}:{e.line}: {e.code}: {e.reason}", file=sys.stderr)
    for e in file_errors:
        print(str(e), file=sys.stderr)
    total["rejected"] += len(file_errors)
    print(" ".join(f"{k}={v}" for k, v in total.items()))
    client.close()
    return 1 if total["rejected"] else 0


def cmd_verify(args) -> int:
    from .pos import PosClient, line
    with PosClient(args.server, **_connection(args)) as pos:
        try:
            resp = pos.verify(args.site, [line(c, args.product, args.units) for c in args.codes],
                              settlement_id=args.settlement_id, all_or_nothing=args.all_or_nothing,
                              insured_id=_insured_arg(args.insured_id))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            print(f"REFUSED: {exc.details()}")  # a sanction binds the site or the person
            return 4
    _print_results(resp)
    return 0 if all(r.verdict == pb.OK for r in resp.results) else 3


def cmd_reverse(args) -> int:
    from .pos import PosClient
    with PosClient(args.server, **_connection(args)) as pos:
        resp = pos.reverse(args.site, args.settlement_id, args.lines, args.reason)
    for ln in resp.lines:
        print(f"line {ln.line_index + 1}: {ln.canonical_code} returned {ln.units_returned} unit(s)"
              f"{' (earlier)' if ln.already_reversed else ''}; pack now has {ln.units_used} used")
    return 0


def cmd_history(args) -> int:
    from google.protobuf import json_format
    from .pos import PosClient
    with PosClient(args.server, **_connection(args)) as pos:
        print(json_format.MessageToJson(pos.history(args.code), ensure_ascii=False))
    return 0


def cmd_status(args) -> int:
    from .admin import AdminClient
    resp = AdminClient(args.server, **_connection(args)).set_status(args.code, args.status, args.reason)
    print(f"{resp.canonical_code}: {pb.CodeStatus.Name(resp.previous)} -> {pb.CodeStatus.Name(resp.status)}")
    return 0


def cmd_recall(args) -> int:
    from .admin import AdminClient
    resp = AdminClient(args.server, **_connection(args)).recall(args.product, args.batch, args.status, args.reason)
    print(f"changed={resp.codes_changed} unchanged={resp.codes_unchanged}")
    return 0


def cmd_reverify(args) -> int:
    from .reverify import fewer_gc_passes, run_job
    if args.drop:
        from tracecode.v1 import bulk_pb2, bulk_pb2_grpc
        conn = _connection(args)
        channel = (grpc.secure_channel(args.server, conn["credentials"]) if conn["credentials"]
                   else grpc.insecure_channel(args.server))
        stub = bulk_pb2_grpc.BulkVerificationStub(channel)
        resp = stub.DropJob(bulk_pb2.DropJobRequest(job_id=args.job_id), metadata=conn["metadata"])
        print(f"deleted {resp.keys_deleted} keys")
        return 0
    with fewer_gc_passes():
        summary = run_job(args.server, args.files, args.out, job_id=args.job_id, mode=args.mode,
                          fmt=args.format, resume=args.resume, keep_namespace=args.keep_namespace,
                          chunk_size=args.chunk_size, progress=not args.quiet, max_rate=args.max_rate,
                          **_connection(args))
    flagged = sum(n for v, n in summary["verdicts"].items() if v != "OK")
    print(f"{summary['records']} records, {flagged} flagged, {summary['bad_records']} bad; "
          f"rings: {summary['rings']}; report in {args.out}")
    return 0


def _insured_arg(value: str | None) -> str:
    # "-": read the id from stdin, so a person's id stays out of shell history and `ps`.
    return sys.stdin.readline().strip() if value == "-" else (value or "")


def _when(text: str | None):
    from datetime import datetime
    if not text:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise SystemExit(f"error: {text!r} needs an offset, e.g. 2026-12-01T00:00:00+08:00")
    return t


def _print_sanction(s) -> None:
    from tracecode.v1 import admin_pb2 as apb
    until = s.valid_until.ToJsonString() if s.HasField("valid_until") else "until lifted"
    lifted = f" lifted {s.lifted_at.ToJsonString()} by {s.lifted_by}" if s.HasField("lifted_at") else ""
    print(f"{s.sanction_id} {apb.SanctionKind.Name(s.kind)} {apb.SanctionSubject.Name(s.subject)}:{s.subject_id} "
          f"from {s.valid_from.ToJsonString()} {until} in_force={s.in_force} ref={s.reference!r} "
          f"by {s.actor}{lifted}: {s.reason}")


def cmd_sanction(args) -> int:
    from .admin import AdminClient
    admin = AdminClient(args.server, **_connection(args))
    try:
        if args.action == "set":
            _print_sanction(admin.set_sanction(
                args.kind, request_id=args.request_id, site_id=args.site or "",
                insured_id=_insured_arg(args.insured_id), valid_from=_when(args.valid_from),
                valid_until=_when(args.valid_until), reason=args.reason, reference=args.reference,
                actor=args.actor))
        elif args.action == "lift":
            _print_sanction(admin.lift_sanction(args.sanction_id, args.reason, args.actor))
        else:
            for s in admin.list_sanctions(site_id=args.site or "", insured_id=_insured_arg(args.insured_id),
                                          insured_pseudonym=args.pseudonym or "",
                                          include_history=args.history, reference=args.reference):
                _print_sanction(s)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        admin.close()
    return 0


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _connection(args) -> dict:
    """PosClient/AdminClient keyword arguments from the client security flags: TLS (server CA,
    client certificate for mtls) and a bearer token (auth = token), sent as metadata."""
    creds = None
    if args.tls_ca or args.tls_cert:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("error: --tls-cert and --tls-key go together")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read_file(args.tls_ca) if args.tls_ca else None,
            private_key=_read_file(args.tls_key) if args.tls_key else None,
            certificate_chain=_read_file(args.tls_cert) if args.tls_cert else None)
    metadata: tuple[tuple[str, str], ...] = ()
    if args.token_file:
        token = _read_file(args.token_file).decode().strip()
        metadata = (("authorization", f"Bearer {token}"),)
    return {"credentials": creds, "metadata": metadata}


def cmd_token(args) -> int:
    from tracecode.server.api.auth import issue_token, read_secret
    print(issue_token(read_secret(args.secret_file), args.role, args.name, args.ttl_days * 86400))
    return 0


def cmd_demo(args) -> int:
    from .demo import run
    return run()


def cmd_console(args) -> int:
    from tracecode.console.cli import main as console_main  # the console extra: pip install .[console]
    return console_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    from tracecode.server import config as cfg
    p = argparse.ArgumentParser(prog="tracecode", description="Drug traceability-code verification")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server (embedded Redis unless --redis-url)")
    cfg.add_arguments(s)
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("migrate-layout", help="move a data set from Redis layout 1 to layout 2 "
                                              "(servers stopped; resumable; docs/operations.md)")
    cfg.add_arguments(m)
    m.set_defaults(func=cmd_migrate_layout)

    x = sub.add_parser("prune-expired", help="drop the state of packs past expiry + return window (layout 2; "
                                             "safe beside running servers)")
    cfg.add_arguments(x)
    x.add_argument("--cutoff", type=int, help="YYYYMMDD: packs expiring before it go (default: today minus "
                                              "return_window_days, issuer's calendar)")
    x.set_defaults(func=cmd_prune_expired)

    def client_parser(name, help):
        c = sub.add_parser(name, help=help)
        c.add_argument("--server", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
        env = os.environ.get
        c.add_argument("--tls-ca", default=env("TRACECODE_CLIENT_TLS_CA"),
                       help="CA certificate (PEM) to verify the server: connect with TLS")
        c.add_argument("--tls-cert", default=env("TRACECODE_CLIENT_TLS_CERT"),
                       help="client certificate (PEM) naming site:<id> or admin:<name> (auth = mtls)")
        c.add_argument("--tls-key", default=env("TRACECODE_CLIENT_TLS_KEY"), help="private key of --tls-cert")
        c.add_argument("--token-file", default=env("TRACECODE_TOKEN_FILE"),
                       help="file holding a bearer token (auth = token; see `tracecode token`)")
        return c

    c = client_parser("load", "load issuance records from CSV/JSONL files (.gz too)")
    c.add_argument("files", nargs="+")
    c.add_argument("--replace", action="store_true", help="overwrite records issued for another product")
    c.set_defaults(func=cmd_load)

    c = client_parser("verify", "verify and dispense codes as one settlement")
    c.add_argument("codes", nargs="+")
    c.add_argument("--site", required=True)
    c.add_argument("--product", required=True, help="billed product id (applies to every code)")
    c.add_argument("--units", type=int, default=0, help="units per code (0 = whole pack)")
    c.add_argument("--settlement-id", help="idempotency key (default: a new one)")
    c.add_argument("--all-or-nothing", action="store_true")
    c.add_argument("--insured-id", help="the insured person's id as read; - reads stdin")
    c.set_defaults(func=cmd_verify)

    c = client_parser("reverse", "return (reverse) a settlement or some of its lines")
    c.add_argument("settlement_id")
    c.add_argument("--site", required=True)
    c.add_argument("--lines", type=int, nargs="*", default=[], help="0-based line indexes (default all)")
    c.add_argument("--reason", default="")
    c.set_defaults(func=cmd_reverse)

    c = client_parser("history", "a code's issuance record and events")
    c.add_argument("code")
    c.set_defaults(func=cmd_history)

    c = client_parser("status", "set a code's status (admin)")
    c.add_argument("code")
    c.add_argument("status", choices=["ACTIVE", "RECALLED", "LOCKED", "STOLEN", "DESTROYED"])
    c.add_argument("--reason", default="")
    c.set_defaults(func=cmd_status)

    c = client_parser("recall", "recall every code of a product batch (admin)")
    c.add_argument("--product", required=True)
    c.add_argument("--batch", required=True)
    c.add_argument("--status", default="RECALLED")
    c.add_argument("--reason", default="")
    c.set_defaults(func=cmd_recall)

    c = client_parser("reverify", "stream settlement exports (CSV/JSONL/.gz/Parquet) through the checks")
    c.add_argument("files", nargs="*")
    c.add_argument("--out", default="reverify-report", help="report directory (default reverify-report)")
    c.add_argument("--job-id", default=None, help="names the REPLAY namespace; reuse it with --resume")
    c.add_argument("--mode", choices=["replay", "check"], default="replay",
                   help="replay: rebuild state from the files alone (default); check: against live state")
    c.add_argument("--format", choices=["csv", "jsonl"], default="csv", help="flagged rows file format")
    c.add_argument("--resume", action="store_true", help="continue an interrupted job from its checkpoint")
    c.add_argument("--keep-namespace", action="store_true", help="keep the REPLAY state after the job")
    c.add_argument("--chunk-size", type=int, default=500, help="settlements per chunk")
    c.add_argument("--max-rate", type=float, default=0, help="cap on settlements/s (0: none)")
    c.add_argument("--quiet", action="store_true", help="no progress line")
    c.add_argument("--drop", action="store_true", help="only drop the namespace of --job-id")
    c.set_defaults(func=cmd_reverify)

    c = client_parser("sanction", "set, lift or list sanctions of sites and insured persons (admin)")
    actions = c.add_subparsers(dest="action", required=True)
    for name, help in (("set", "impose a sanction"), ("lift", "lift a sanction"), ("list", "list sanctions")):
        a = actions.add_parser(name, help=help)
        # The connection flags live on `sanction`; each action takes its own.
        for action in c._actions:
            if action.dest in ("server", "tls_ca", "tls_cert", "tls_key", "token_file"):
                a.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        if name == "set":
            a.add_argument("kind", choices=["SUSPEND_SERVICE", "TERMINATE_AGREEMENT", "BLACKLIST", "SUSPEND_CARD"])
            a.add_argument("--request-id", required=True, help="idempotency key (e.g. the ledger action's id)")
            a.add_argument("--valid-from", help="ISO time with offset (default now)")
            a.add_argument("--valid-until", help="ISO time with offset (SUSPEND_* only; default until lifted)")
            a.add_argument("--reference", default="", help="the lead or case it came from")
        if name in ("set", "list"):
            a.add_argument("--site", help="the site (SUSPEND_SERVICE, TERMINATE_AGREEMENT, BLACKLIST)")
            a.add_argument("--insured-id", help="the insured person's id as read (SUSPEND_CARD); - reads stdin")
        if name == "lift":
            a.add_argument("sanction_id")
        if name in ("set", "lift"):
            a.add_argument("--reason", default="", help="why (required for set)")
            a.add_argument("--actor", default="", help="who approved it (default: the caller's identity)")
        if name == "list":
            a.add_argument("--pseudonym", help="an insured pseudonym (KEY_ID.hex)")
            a.add_argument("--history", action="store_true", help="every entry, lifted and ended ones too")
            a.add_argument("--reference", default="")
    c.set_defaults(func=cmd_sanction)

    t = sub.add_parser("token", help="issue a bearer token for auth = token (run where the secret is)")
    t.add_argument("--secret-file", required=True, help="the server's auth_token_secret_file")
    t.add_argument("--role", choices=["site", "admin"], required=True)
    t.add_argument("--name", required=True, help="site id, or the operator's name")
    t.add_argument("--ttl-days", type=float, default=30.0, help="validity (default 30 days)")
    t.set_defaults(func=cmd_token)

    from tracecode.leads.cli import add_parser as add_leads
    add_leads(sub)

    d = sub.add_parser("demo", help="self-contained demo: embedded Redis, sample data, a resold pack")
    d.set_defaults(func=cmd_demo)

    # prefix_chars: every argument after "console" is the console's own (its parser reads them).
    k = sub.add_parser("console", add_help=False, prefix_chars="\x00",
                       help="the leads ledger web console (`tracecode console -h`)")
    k.add_argument("rest", nargs=argparse.REMAINDER)
    k.set_defaults(func=cmd_console)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reverify":
        ckpt = os.path.join(args.out, "checkpoint.json")
        if not args.job_id and args.resume and os.path.exists(ckpt):
            with open(ckpt, encoding="utf-8") as fh:
                args.job_id = json.load(fh)["job_id"]
        if not args.job_id:
            if args.resume or args.drop:
                parser.error("--resume and --drop need the --job-id of the job")
            import uuid
            args.job_id = "job-" + uuid.uuid4().hex[:12]
        if not args.drop and not args.files:
            parser.error("reverify: at least one FILE")
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
