"""The audit archive as a Parquet data set (docs/archive.md): its schema, where a batch's files go,
writing them exactly once, listing, and compacting a partition.

    <root>/date=YYYY-MM-DD/s<bbbb>_<first id>_<last id>.parquet      one stream's ID range
    <root>/date=YYYY-MM-DD/c<unique>.parquet                          a compacted partition
    <root>/date=YYYY-MM-DD/_compacted.json                            what a compaction replaced

The date is the settlement date in the issuer's calendar (a settlement's settled_at, otherwise
the server's time of the entry). A batch of one stream's entries from `first` to `last` may span
dates: each date gets its own file, all named by the batch's range, so the names depend only on
the range and a rewrite after a crash produces the same names (never a second copy).

A file is written under a temporary name ('.' prefix, '.tmp' suffix: ignored by pyarrow's and
DuckDB's readers), flushed and fsynced, then renamed into place (atomic on a POSIX filesystem).
On S3-compatible storage an object appears whole when its upload completes, so files are
written directly under their final names there.

May import: the standard library, pyarrow, and the rules core (the audit fields).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tracecode.rules.schema import AUDIT_FIELDS, AUDIT_TYPES

# Column name, type, the audit letter it comes from ('' derived), what it holds (docs/archive.md).
COLUMNS = (
    ("stream", pa.int16(), "", "the audit stream (bucket 0-1023) the entry was written to"),
    ("entry_id", pa.string(), "", "its stream entry ID: with `stream`, the entry's identity"),
    ("server_at", pa.timestamp("ms", tz="UTC"), "", "the server's time of the entry (from its ID)"),
    ("event", pa.string(), "t", "one of rules.schema.AUDIT_TYPES (DISPENSED, ATTEMPT, NOTICE, RECEIVED, ...)"),
    ("code", pa.string(), "c", "canonical code (null: a refusal or a sanction change)"),
    ("product_id", pa.string(), "g", "the billed product of the line (DISPENSED, ATTEMPT)"),
    ("units", pa.int32(), "u", "units"),
    ("verdict", pa.string(), "", "ATTEMPT: the flagged verdict; DISPENSED: OK; else null"),
    ("reason", pa.string(), "", "REFUSED/REVERSED/STATUS_CHANGED/sanction changes: the reason or change"),
    ("site", pa.string(), "s", "site id (a status or sanction change: the actor's site, if any)"),
    ("settlement_id", pa.string(), "i", "settlement id"),
    ("line", pa.int32(), "l", "line index in the settlement (-1: the settlement as a whole)"),
    ("settled_at", pa.timestamp("ms", tz="UTC"), "a", "DISPENSED, ATTEMPT, NOTICE: the settlement's settled_at; else null"),
    ("event_at", pa.timestamp("ms", tz="UTC"), "a", "the entry's own time: settled_at, or the server's clock"),
    ("insured_pseudonym", pa.string(), "p", "insured pseudonym (keyed; never a raw insured id)"),
    ("sanction_id", pa.string(), "n", "the sanction a refusal named, or the sanction changed"),
    ("sanction_kind", pa.string(), "k", "its kind"),
    ("sanction_reference", pa.string(), "r", "its reference (sanction changes)"),
    ("sanction_actor", pa.string(), "b", "who imposed or lifted it (sanction changes)"),
    ("supplier", pa.string(), "d", "RECEIVED, RECEIVE_FLAGGED: the supplier (settlement_id: the delivery id)"),
    ("figures", pa.string(), "f", "NOTICE and a live rule's REFUSED: the rule's figures (JSON, rules/live.py)"),
)
SCHEMA = pa.schema([pa.field(name, typ, metadata={"doc": doc}) for name, typ, _, doc in COLUMNS])
# Events that are a settlement's: their 'a' is the settlement's settled_at (NOTICE: a live rule's
# notice on it, rules/live.py).
SETTLEMENT_EVENTS = ("DISPENSED", "ATTEMPT", "NOTICE")
ROW_GROUP_ROWS = 1_000_000  # scans read whole row groups: big ones, few footers
COMPRESSION = "zstd"
FILE = re.compile(r"s(\d{4})_(\d+-\d+)_(\d+-\d+)\.parquet\Z")
MANIFEST = "_compacted.json"
COMPACT_ATTEMPTS = 4
# One upload to object storage, tried afresh (a new upload each time) this many times: endpoints
# answer a CompleteMultipartUpload with an error now and then (S3's documented 200-with-error), and
# an upload under a name is atomic, so a repeat is safe.
UPLOAD_ATTEMPTS = 4

log = logging.getLogger("tracecode.archive")

# Every field an audit entry can carry has its column (x, the verdict or reason, is split in
# two by event): nothing the scripts write is left behind in Redis.
assert {letter for _, _, letter, _ in COLUMNS if letter} | {"x"} == set(AUDIT_FIELDS)


class ArchiveError(ValueError):
    """A bad archive location or file, named."""


def open_root(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) of an archive URI: a local path, file://, s3://bucket/prefix (pyarrow's
    S3 options in the query, e.g. ?endpoint_override=...), or any URI pyarrow knows."""
    if not uri:
        raise ArchiveError("archive: no URI given (--archive PATH or s3://bucket/prefix)")
    if "://" not in uri:
        path = os.path.abspath(uri)
        os.makedirs(path, exist_ok=True)
        return pafs.LocalFileSystem(), path
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArchiveError(f"archive {uri!r}: {exc}") from exc
    fs.create_dir(path, recursive=True)
    return fs, path.rstrip("/")


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def file_name(bucket: int, first: str, last: str) -> str:
    return f"s{bucket:04d}_{first}_{last}.parquet"


class Days:
    """The issuer's calendar date (YYYY-MM-DD) of a time in ms, cached per hour (offsets change
    on the hour at most): a batch's dates cost a dict lookup per entry."""

    def __init__(self, timezone: str):
        self.tz = ZoneInfo(timezone)
        self._hours: dict[int, str] = {}

    def __call__(self, ms: int) -> str:
        hour = ms // 3_600_000
        day = self._hours.get(hour)
        if day is None:
            day = self._hours[hour] = datetime.fromtimestamp(hour * 3600, self.tz).strftime("%Y-%m-%d")
        return day


def _int(text: str | None, what: str, entry: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ArchiveError(f"audit entry {entry}: field {what!r} = {text[:40]!r} is not an integer") from None


@dataclass
class Rows:
    """Columns under construction for one file."""
    cols: dict[str, list]

    @classmethod
    def empty(cls) -> "Rows":
        return cls({name: [] for name, _, _, _ in COLUMNS})

    def __len__(self) -> int:
        return len(self.cols["entry_id"])

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=SCHEMA)


def split_by_date(bucket: int, entries: Iterable[tuple[str, dict[str, str]]], days: Days) -> dict[str, Rows]:
    """One stream's entries (entry id, fields by letter) as rows per settlement date. An entry with
    an unknown event type or a non-integer number is an error naming the entry and field: the
    archive holds what the scripts write, and a script writing something else is a bug to see."""
    out: dict[str, Rows] = {}
    for eid, f in entries:
        where = f"{bucket}/{eid}"
        event = f.get("t", "")
        if event not in AUDIT_TYPES:
            raise ArchiveError(f"audit entry {where}: field 't' = {event[:40]!r} is not one of {', '.join(AUDIT_TYPES)}")
        server_ms = int(eid.split("-")[0])
        at = _int(f.get("a"), "a", where)
        settlement = event in SETTLEMENT_EVENTS
        settled = at if settlement else None
        day = days(settled if settled is not None else server_ms)
        rows = out.get(day)
        if rows is None:
            rows = out[day] = Rows.empty()
        c = rows.cols
        x = f.get("x") or None
        c["stream"].append(bucket)
        c["entry_id"].append(eid)
        c["server_at"].append(server_ms)
        c["event"].append(event)
        c["code"].append(f.get("c") or None)
        c["product_id"].append(f.get("g") or None)
        c["units"].append(_int(f.get("u"), "u", where))
        c["verdict"].append(x if event == "ATTEMPT" else ("OK" if event == "DISPENSED" else None))
        c["reason"].append(None if settlement else x)
        c["site"].append(f.get("s") or None)
        c["settlement_id"].append(f.get("i") or None)
        c["line"].append(_int(f.get("l"), "l", where))
        c["settled_at"].append(settled)
        c["event_at"].append(at if at is not None else server_ms)
        c["insured_pseudonym"].append(f.get("p") or None)
        c["sanction_id"].append(f.get("n") or None)
        c["sanction_kind"].append(f.get("k") or None)
        c["sanction_reference"].append(f.get("r") or None)
        c["sanction_actor"].append(f.get("b") or None)
        c["supplier"].append(f.get("d") or None)
        c["figures"].append(f.get("f") or None)
    return out


class Archive:
    """The data set at one URI: write a file exactly once, list, compact."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = open_root(uri)
        self.local = is_local(self.fs)

    def partition(self, day: str) -> str:
        return f"{self.root}/date={day}"

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def write(self, path: str, table: pa.Table, *, before_rename=lambda: None, sync_dir: bool = True) -> int:
        """Write table at path atomically; its size in bytes. Locally: a temporary file, fsync,
        rename, fsync of the directory (the rename itself must survive a power cut before the
        entries are acknowledged; sync_dir=False: the caller syncs the directory once, `sync`,
        after several renames and before acknowledging any of them). Elsewhere (S3): straight
        to the name (an upload is atomic)."""
        folder, name = path.rsplit("/", 1)
        if not self.local:
            self.fs.create_dir(folder, recursive=True)
            self._upload(path, lambda: pq.write_table(table, path, filesystem=self.fs, compression=COMPRESSION,
                                                      row_group_size=ROW_GROUP_ROWS))
            before_rename()
            return self.fs.get_file_info(path).size
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression=COMPRESSION, row_group_size=ROW_GROUP_ROWS)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        before_rename()
        os.replace(tmp, path)
        if sync_dir:
            _fsync_dir(folder)
        return size

    def sync(self, folders: Iterable[str]) -> None:
        """Make the renames into these partition folders durable (local filesystems)."""
        if self.local:
            for folder in set(folders):
                _fsync_dir(folder)

    def dates(self) -> list[str]:
        sel = pafs.FileSelector(self.root, allow_not_found=True)
        return sorted(i.base_name[5:] for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("date="))

    def files(self, day: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.partition(day), allow_not_found=True)
        return sorted((i for i in self.fs.get_file_info(sel)
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                       and not i.base_name.startswith((".", "_"))), key=lambda i: i.base_name)

    def live_files(self, day: str) -> list[str]:
        """The paths a reader reads in a partition: its files less those a compaction replaced
        (when its merged file exists: docs/archive.md)."""
        files = self.files(day)
        manifest = f"{self.partition(day)}/{MANIFEST}"
        if self.exists(manifest):
            with self.fs.open_input_stream(manifest) as fh:
                m = json.loads(fh.read().decode())
            if any(i.base_name == m["merged"] for i in files):
                gone = set(m["replaced"])
                files = [i for i in files if i.base_name not in gone]
        return [i.path for i in files]

    def read_paths(self, paths: list[str]) -> pa.Table:
        tables = [pq.read_table(p, filesystem=self.fs, schema=SCHEMA) for p in paths]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def read(self, day: str | None = None) -> pa.Table:
        """Every row (of one date), as one table: for tests and the inspector's small questions."""
        days = [day] if day else self.dates()
        tables = [pq.read_table(p, filesystem=self.fs, schema=SCHEMA) for d in days for p in self.live_files(d)]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def compact(self, day: str, *, committed=lambda bucket, last: True) -> tuple[int, int]:
        """Merge a partition's files into one, atomically for readers: the manifest naming what
        is replaced is written first, then the merged file renamed into place, then the replaced
        files deleted. Readers list files through `live_files`, which leaves out whatever a
        merged file that exists replaced: before the rename they see the small files, after it
        the merged one, never both. Only files whose range the archiver has committed
        (`committed(bucket, last)`) are merged: an uncommitted one may be rewritten after a
        crash under its own name. (files merged, rows).

        On object storage a failed request (an endpoint answering 500 to a multipart upload)
        restarts the compaction from the listing, up to COMPACT_ATTEMPTS times: every step of it
        is safe to repeat (a manifest naming a merged file that was never written is ignored and
        removed by `recover`; a merged file written twice leaves one, the other's replaced files
        already gone)."""
        attempts = 1 if self.local else COMPACT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                return self._compact_once(day, committed)
            except OSError as exc:
                if attempt == attempts:
                    raise
                log.warning("archive: compaction of %s failed (attempt %d of %d), restarting: %s",
                            day, attempt, attempts, exc)
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def _compact_once(self, day: str, committed) -> tuple[int, int]:
        self.recover()
        small, olds = [], []
        for i in self.files(day):
            m = FILE.match(i.base_name)
            if m and committed(int(m.group(1)), m.group(3)):
                small.append(i)
            elif i.base_name.startswith("c"):
                olds.append(i)
        if len(small) + len(olds) < 2:
            return 0, 0
        parts = [pq.read_table(i.path, filesystem=self.fs, schema=SCHEMA) for i in olds + small]
        table = pa.concat_tables(parts).sort_by([("stream", "ascending"), ("server_at", "ascending")])
        merged = f"{self.partition(day)}/c{uuid.uuid4().hex[:16]}.parquet"
        replaced = [i.base_name for i in olds + small]
        # The manifest first (what is about to be replaced), then the merged file, then the deletes:
        # a crash before the rename leaves the small files (and a stale manifest naming a merged file
        # that does not exist: ignored); after it, `recover()` finishes the deletes.
        self.write_text(f"{self.partition(day)}/{MANIFEST}",
                         json.dumps({"merged": merged.rsplit("/", 1)[1], "replaced": replaced}))
        self.write(merged, table)
        self._delete(day, replaced)
        self.fs.delete_file(f"{self.partition(day)}/{MANIFEST}")
        return len(replaced), table.num_rows

    def recover(self) -> int:
        """Finish compactions a crash interrupted: where the merged file exists, delete what it
        replaced. Files deleted."""
        done = 0
        for day in self.dates():
            path = f"{self.partition(day)}/{MANIFEST}"
            if not self.exists(path):
                continue
            with self.fs.open_input_stream(path) as fh:
                m = json.loads(fh.read().decode())
            if self.exists(f"{self.partition(day)}/{m['merged']}"):
                done += self._delete(day, m["replaced"])
            self.fs.delete_file(path)
        return done

    def _delete(self, day: str, names: list[str]) -> int:
        n = 0
        for name in names:
            path = f"{self.partition(day)}/{name}"
            if self.exists(path):
                self.fs.delete_file(path)
                n += 1
        if self.local:
            _fsync_dir(self.partition(day))
        return n

    def write_text(self, path: str, text: str) -> None:
        """A small text file at path, whole or not at all (the compaction's manifest)."""
        if self.local:
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            return
        def put() -> None:
            with self.fs.open_output_stream(path) as out:
                out.write(text.encode())
        self._upload(path, put)

    def _upload(self, path: str, put) -> None:
        """Run put (one whole upload to path) until it succeeds, UPLOAD_ATTEMPTS at most."""
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                put()
                return
            except OSError as exc:
                if attempt == UPLOAD_ATTEMPTS:
                    raise
                log.warning("archive: upload of %s failed (attempt %d of %d), retrying: %s",
                            path, attempt, UPLOAD_ATTEMPTS, exc)
                time.sleep(0.5 * 2 ** (attempt - 1))


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
