"""The server's subcommands of `tracecode` (registered by tracecode.cli):

    tracecode serve [settings]                 run the gRPC server (embedded Redis unless --redis-url)
    tracecode prune-expired [--cutoff D]       drop packs past expiry + return window
    tracecode token --secret-file F ...        issue a bearer token (auth = token)
    tracecode scripts list | show NAME | render [DIR]
                                               the Lua scripts exactly as Redis runs them

May import: every package of tracecode.server (it is their command line) and the rules core.
"""
from __future__ import annotations

import os
import sys
import time

# The scripts the store loads (store.Store), by file name; `scripts render` writes each rendered.
SCRIPTS = ("verify.lua", "reverse.lua", "issue.lua", "status.lua", "commit.lua", "claim.lua", "decide.lua",
           "sanction.lua", "read.lua", "prune.lua", "archive_commit.lua", "live.lua", "receive.lua", "batch.lua")
RENDERED_DIR = os.path.join("server", "store", "lua", "rendered")


def cmd_serve(args) -> int:
    from tracecode.rules.pseudonym import Pseudonymizer

    from . import config as cfg
    from .api.auth import from_config
    from .app import serve
    try:
        config = cfg.from_args(args)
        from_config(config)  # the security settings, checked before anything starts
        if config.pseudonym_key_file:  # a given key file must be usable before anything starts
            Pseudonymizer.from_file(config.pseudonym_key_file)
        if config.models_config:  # a wrong threshold fails the start, naming the file and key
            from tracecode.rules import live
            live.load(config.models_config)
    except (ValueError, OSError) as exc:  # a setting wrong, missing or unreadable: say which
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def cmd_prune_expired(args) -> int:
    from . import config as cfg
    from .app import prune_expired
    from .errors import TracecodeError
    try:
        config = cfg.from_args(args)
        started = time.monotonic()
        s = prune_expired(config, args.cutoff, force=args.force, dry_run=args.dry_run)
    except (ValueError, OSError, TracecodeError) as exc:  # TracecodeError: the data-set marker, Redis down
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verb = "would drop" if s.dry_run else "dropped"
    print(f"prune-expired: {verb} {s.pruned} packs expiring before {s.cutoff_day}, of {s.codes} codes in "
          f"{s.buckets} buckets, in {time.monotonic() - started:.1f} s" + (" (dry run: nothing dropped)" if s.dry_run else ""))
    return 0


def cmd_token(args) -> int:
    from .api.auth import issue_token, read_secret
    print(issue_token(read_secret(args.secret_file), args.role, args.name, args.ttl_days * 86400))
    return 0


def rendered(name: str) -> str:
    """A script exactly as the store loads it (store.script_text: its shared parts spliced in)."""
    from .store.store import script_text
    return script_text(name)


def cmd_scripts(args) -> int:
    if args.action == "list":
        print("\n".join(SCRIPTS))
        return 0
    if args.action == "show":
        name = args.name if args.name.endswith(".lua") else f"{args.name}.lua"
        if name not in SCRIPTS:
            print(f"error: no script {args.name!r}; one of: {', '.join(SCRIPTS)}", file=sys.stderr)
            return 2
        sys.stdout.write(rendered(name))
        return 0
    os.makedirs(args.dir, exist_ok=True)
    for name in SCRIPTS:
        with open(os.path.join(args.dir, name), "w", encoding="utf-8") as fh:
            fh.write(rendered(name))
    print(f"{len(SCRIPTS)} scripts rendered into {args.dir}")
    return 0


def register(sub) -> None:
    """Add the server's subcommands to the `tracecode` parser's subparsers."""
    from . import config as cfg

    s = sub.add_parser("serve", help="run the gRPC server (embedded Redis unless --redis-url)")
    cfg.add_arguments(s)
    s.set_defaults(func=cmd_serve)

    x = sub.add_parser("prune-expired", help="drop the state of packs past expiry + return window "
                                             "(safe beside running servers)")
    cfg.add_arguments(x)
    x.add_argument("--cutoff", type=int, help="YYYYMMDD: packs expiring before it go (default: today minus "
                                              "return_window_days, issuer's calendar; after today refused)")
    x.add_argument("--force", action="store_true", help="allow a cutoff after today (drops packs not yet expired)")
    x.add_argument("--dry-run", action="store_true", help="count what would be dropped; drop nothing")
    x.set_defaults(func=cmd_prune_expired)

    t = sub.add_parser("token", help="issue a bearer token for auth = token (run where the secret is)")
    t.add_argument("--secret-file", required=True, help="the server's auth_token_secret_file")
    t.add_argument("--role", choices=["site", "admin"], required=True)
    t.add_argument("--name", required=True, help="site id, or the operator's name")
    t.add_argument("--ttl-days", type=float, default=30.0, help="validity (default 30 days)")
    t.set_defaults(func=cmd_token)

    k = sub.add_parser("scripts", help="the Lua scripts exactly as Redis runs them (shared parts spliced in)")
    actions = k.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the scripts' names")
    show = actions.add_parser("show", help="print one script as loaded")
    show.add_argument("name", help="e.g. verify (or verify.lua)")
    render = actions.add_parser("render", help=f"write every script as loaded into DIR (the tree keeps them in {RENDERED_DIR})")
    render.add_argument("dir", nargs="?", default=RENDERED_DIR)
    k.set_defaults(func=cmd_scripts)


__all__ = ["register", "SCRIPTS", "RENDERED_DIR", "rendered"]
