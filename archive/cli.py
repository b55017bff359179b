"""The archive room's subcommands of `tracecode` (registered by tracecode.cli):

    tracecode archive [run] --archive URI --redis-url URL [--share I/N] [server settings]
                            archive the audit streams of share I of N (default 0/1: all)
    tracecode archive compact --archive URI --redis-url URL [--date YYYY-MM-DD]
                            merge each partition's (or one date's) committed files into one

The server settings (--redis-url, --redis-cluster, --key-prefix, --code-buckets, --timezone,
--pseudonym-key-file, ...) are the server's own (server/config.py): the archiver opens the same
data set, checks its marker first, and dates entries in the same calendar.

May import: the standard library, prometheus_client, the server's configuration and store (never
redis itself), and this room's modules.
"""
from __future__ import annotations

import logging
import sys
import time

from .dataset import Archive, ArchiveError


def _store(config):
    """The store over the server's Redis, after checking the data-set marker (as prune-expired)."""
    from tracecode.rules.pseudonym import Pseudonymizer
    from tracecode.server.store import DataSetMarker, KeySpace, Store

    if not config.redis_url:
        raise ValueError("archive: --redis-url is required (the Redis the servers use; the archiver never "
                         "starts an embedded one)")
    store = Store.from_url(config.redis_url, timeout_s=config.redis_timeout_s, max_connections=8,
                           keys=KeySpace(config.key_prefix, code_buckets=config.code_buckets),
                           cluster=config.redis_cluster)
    key = Pseudonymizer.from_file(config.pseudonym_key_file) if config.pseudonym_key_file else None
    store.open_dataset(DataSetMarker(config.code_buckets, key.key_id if key else "",
                                     key.fingerprint() if key else ""), create=False)
    return store


def _share(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--share {text!r}: expected I/N, e.g. 0/2") from None
    return i, n


def cmd_archive(args) -> int:
    from tracecode.server import config as cfg
    from tracecode.server.errors import TracecodeError
    from tracecode.server.store.archive import ArchiveStreams, share

    from .archiver import Archiver, Settings, consumer_name
    logging.getLogger().setLevel(logging.INFO)
    try:
        config = cfg.from_args(args)
        archive = Archive(args.archive)
        store = _store(config)
        i, n = _share(args.share)
        streams = ArchiveStreams(store, args.group, share(i, n), consumer_name(i, n))
    except (ValueError, OSError, TracecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "compact":
            return _compact(archive, streams, args.date)
        if args.archive_metrics_port:
            from prometheus_client import start_http_server
            start_http_server(args.archive_metrics_port, "127.0.0.1")
        from .archiver import BOUND
        BOUND.set(config.audit_archive_bound)
        settings = Settings(file_entries=args.file_entries, max_delay_s=args.max_delay_s)
        logging.getLogger("tracecode.archive").info(
            "archive: share %d/%d (%d streams) of %s into %s", i, n, len(streams.buckets), config.redis_url, args.archive)
        return Archiver(streams, archive, config.timezone, settings).run()
    finally:
        store.close()


def _compact(archive: Archive, streams, date: str | None) -> int:
    marks = streams.watermarks()
    from tracecode.server.store.archive import id_key

    def committed(bucket: int, last: str) -> bool:
        return bucket in marks and id_key(last) <= id_key(marks[bucket])

    started = time.monotonic()
    days = [date] if date else archive.dates()
    merged = rows = 0
    for day in days:
        m, r = archive.compact(day, committed=committed)
        merged += m
        rows += r
    print(f"archive compact: {merged} files merged ({rows} rows) in {len(days)} partitions, "
          f"{time.monotonic() - started:.1f} s")
    return 0


def register(sub) -> None:
    from tracecode.server import config as cfg

    a = sub.add_parser("archive", help="archive the audit streams into a Parquet data set (docs/archive.md)")
    a.add_argument("action", nargs="?", choices=["run", "compact"], default="run",
                   help="run (default): archive until SIGTERM; compact: merge each partition's files")
    cfg.add_arguments(a)
    a.add_argument("--archive", required=True, help="the data set: a path, file:///..., or s3://bucket/prefix")
    a.add_argument("--share", default="0/1", help="I/N: this archiver takes the streams with bucket mod N == I")
    a.add_argument("--group", default="archive", help="the archivers' consumer group")
    a.add_argument("--file-entries", type=int, default=20_000, help="write a stream's file at this many entries")
    a.add_argument("--max-delay-s", type=float, default=60.0, help="... or when its oldest entry waited this long")
    a.add_argument("--archive-metrics-port", type=int, default=9465, help="Prometheus /metrics port; 0 disables")
    a.add_argument("--date", help="compact: only this partition (YYYY-MM-DD)")
    a.set_defaults(func=cmd_archive)


__all__ = ["register", "ArchiveError"]
