"""The clients' subcommands of `tracecode` (registered by tracecode.cli): load, verify, receive, reverse,
history, status, recall, reverify, sanction, demo. Each talks to a tracecode server over gRPC.

May import: the clients package, the generated stubs and the rules core; never the server.
"""
from __future__ import annotations

import argparse
import json
import os
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


def _readable_rows(path: str):
    """read_rows(path), ending with one RowError naming the file when it cannot be read (missing,
    unreadable, corrupt .gz, not UTF-8): raised inside the upload stream it would only surface as
    gRPC's anonymous "Exception iterating requests!"."""
    import csv
    from .files import ISSUANCE_FIELDS, ROW_FIELD, InputFileError, RowError, read_rows
    line = 0
    try:
        for row in read_rows(path, ISSUANCE_FIELDS):
            line = row.line
            yield row
    except InputFileError as exc:  # its message names the file and says it cannot be read
        yield RowError(path, line + 1 if line else 0, ROW_FIELD, exc.reason if line else f"cannot read the file: {exc.reason}")
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        yield RowError(path, line + 1 if line else 0, ROW_FIELD, f"cannot read the file: {exc}")


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


def _job_id(args) -> str | None:
    """The job id a reverify run works under: given, read back from an interrupted run's
    checkpoint (--resume), or a new one; None when --resume/--drop have none to go by."""
    ckpt = os.path.join(args.out, "checkpoint.json")
    if not args.job_id and args.resume and os.path.exists(ckpt):
        with open(ckpt, encoding="utf-8") as fh:
            return json.load(fh)["job_id"]
    if args.job_id:
        return args.job_id
    if args.resume or args.drop:
        return None
    import uuid
    return "job-" + uuid.uuid4().hex[:12]


def cmd_reverify(args) -> int:
    from .reverify import fewer_gc_passes, run_job
    args.job_id = _job_id(args)
    if args.job_id is None:
        print("error: reverify: --resume and --drop need the --job-id of the job", file=sys.stderr)
        return 2
    if not args.drop and not args.files:
        print("error: reverify: at least one FILE", file=sys.stderr)
        return 2
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


def cmd_receive(args) -> int:
    """`tracecode receive FILE`: each delivery of a shipment file through the receiving check.
    Exit 0 when every delivery was checked (flagged packs are listed, not failures), 1 when a
    delivery was not sent for bad rows (listed by file, line and field), 2 on an error."""
    from .receiving import ReceivingClient, read_deliveries, verdict_name
    deliveries, loose = read_deliveries(args.file, args.site or "")
    for e in loose:
        print(f"error: {e}", file=sys.stderr)
    if loose:  # rows of no known delivery: any delivery might be short of them
        print(f"{args.file}: nothing sent ({len(loose)} row(s) that belong to no known delivery)", file=sys.stderr)
        return 1
    unsent = 0
    with ReceivingClient(args.server, **_connection(args)) as client:
        for d in deliveries:
            if d.errors:
                unsent += 1
                for e in d.errors:
                    print(f"error: {e}", file=sys.stderr)
                print(f"delivery {d.delivery_id}: NOT sent ({len(d.errors)} bad row(s))", file=sys.stderr)
                continue
            resp = client.receive(d.site_id, d.delivery_id, d.lines, supplier=d.supplier)
            flagged = [r for r in resp.results if r.verdict != pb.OK]
            print(f"delivery {d.delivery_id} at site {resp.site_id}: {resp.accepted} of {len(d.lines)} packs "
                  f"received{' (replayed)' if resp.replayed else ''}, {len(flagged)} flagged")
            for r in flagged:
                print(f"  {args.file}:{d.rows[r.line_index]}: {verdict_name(r.verdict):<20} "
                      f"{r.canonical_code or d.lines[r.line_index][0]}  {r.reason}")
    return 1 if unsent else 0


def cmd_demo(args) -> int:
    from .demo import run
    return run()


def _answering_rpc_errors(cmd):
    """A command whose gRPC failure ends as one line `error: STATUS: details` and exit 2, and
    whose unreadable input file (files.InputFileError and every other OSError: missing,
    unreadable, truncated) as one line `error: FILE: ...`, exit 2, never a traceback."""
    def run(args) -> int:
        try:
            return cmd(args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


def register(sub) -> None:
    """Add the clients' subcommands to the `tracecode` parser's subparsers."""

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
    c.set_defaults(func=_answering_rpc_errors(cmd_load))

    c = client_parser("verify", "verify and dispense codes as one settlement")
    c.add_argument("codes", nargs="+")
    c.add_argument("--site", required=True)
    c.add_argument("--product", required=True, help="billed product id (applies to every code)")
    c.add_argument("--units", type=int, default=0, help="units per code (0 = whole pack)")
    c.add_argument("--settlement-id", help="idempotency key (default: a new one)")
    c.add_argument("--all-or-nothing", action="store_true")
    c.add_argument("--insured-id", help="the insured person's id as read; - reads stdin")
    c.set_defaults(func=_answering_rpc_errors(cmd_verify))

    c = client_parser("receive", "the receiving check (入库核验) of a shipment file's deliveries")
    c.add_argument("file", help="CSV/JSONL/.gz/Parquet: delivery_id, code[, product_id, supplier, site_id]")
    c.add_argument("--site", help="the receiving site (else the file's site_id column; a pharmacy's token names it)")
    c.set_defaults(func=_answering_rpc_errors(cmd_receive))

    c = client_parser("reverse", "return (reverse) a settlement or some of its lines")
    c.add_argument("settlement_id")
    c.add_argument("--site", required=True)
    c.add_argument("--lines", type=int, nargs="*", default=[], help="0-based line indexes (default all)")
    c.add_argument("--reason", default="")
    c.set_defaults(func=_answering_rpc_errors(cmd_reverse))

    c = client_parser("history", "a code's issuance record and events")
    c.add_argument("code")
    c.set_defaults(func=_answering_rpc_errors(cmd_history))

    c = client_parser("status", "set a code's status (admin)")
    c.add_argument("code")
    c.add_argument("status", choices=["ACTIVE", "RECALLED", "LOCKED", "STOLEN", "DESTROYED"])
    c.add_argument("--reason", default="")
    c.set_defaults(func=_answering_rpc_errors(cmd_status))

    c = client_parser("recall", "recall every code of a product batch (admin)")
    c.add_argument("--product", required=True)
    c.add_argument("--batch", required=True)
    c.add_argument("--status", default="RECALLED")
    c.add_argument("--reason", default="")
    c.set_defaults(func=_answering_rpc_errors(cmd_recall))

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
    c.set_defaults(func=_answering_rpc_errors(cmd_reverify))

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
    c.set_defaults(func=_answering_rpc_errors(cmd_sanction))

    d = sub.add_parser("demo", help="self-contained demo: a server on a throw-away embedded Redis, sample data, "
                                    "a resold pack")
    d.set_defaults(func=_answering_rpc_errors(cmd_demo))
