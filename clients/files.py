"""Streaming readers of the operators' files (../shared/spec/files.md): CSV (UTF-8, header row,
RFC 4180) or JSONL, `.gz` read transparently. Rows are yielded one by one, never loaded whole.

A row missing a required field comes out as a RowError naming file, line and field: the caller
counts and reports it; nothing is skipped silently. Unknown columns produce one warning.
"""
from __future__ import annotations

import csv
import gzip
import io
import typing
import json
import logging
import operator
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("tracecode.files")

ISSUANCE_FIELDS = {"code": True, "product_id": True, "gtin": False, "batch": False, "expiry": False,
                   "pack_units": False, "manufacturer": False, "status": False}
SETTLEMENT_FIELDS = {"site_id": True, "settlement_id": True, "settled_at": True, "line_no": True,
                     "code": True, "product_id": True, "units": False, "insured_id": False}


@dataclass(slots=True)
class Row:
    source: str
    line: int  # 1-based physical line of the row in its file (CSV header is line 1)
    fields: dict[str, str]


@dataclass(slots=True)
class RowError:
    source: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.reason}"


class ByteCounter:
    """Bytes read so far from the files on disk (compressed bytes for .gz): progress and ETA."""

    def __init__(self):
        self.read = 0


class _Counting(io.RawIOBase):
    def __init__(self, raw, counter: ByteCounter):
        self.raw, self.counter = raw, counter

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.counter.read += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_text(path: str, counter: ByteCounter | None = None) -> io.TextIOBase:
    raw = open(path, "rb", buffering=0)
    binary: typing.BinaryIO = io.BufferedReader(_Counting(raw, counter) if counter else raw, 1 << 16)
    if path.endswith(".gz"):
        binary = gzip.GzipFile(fileobj=binary, mode="rb")  # type: ignore[assignment]
    return io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")


def _parquet_rows(path: str, schema: dict[str, bool], counter: ByteCounter | None):
    """Parquet (optional: pip install 'tracecode[parquet]'); row numbers are 1-based data rows."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"{path}: reading Parquet needs pyarrow: pip install 'tracecode[parquet]'") from None
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    unknown = names - set(schema)
    if unknown:
        log.warning("%s: ignoring unknown field(s) %s", path, ", ".join(sorted(unknown)))
    cols = [c for c in schema if c in names]
    line = 0
    for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=cols)
        if counter:
            counter.read += pf.metadata.row_group(group).total_byte_size
        for raw in table.to_pylist():
            line += 1
            fields = {k: ("" if v is None else str(v)).strip() for k, v in raw.items()}
            missing = next((n for n, req in schema.items() if req and not fields.get(n)), None)
            yield RowError(path, line, missing, "required field is missing or empty") if missing \
                else Row(path, line, fields)


def _is_jsonl(path: str) -> bool:
    base = path[:-3] if path.endswith(".gz") else path
    return base.endswith((".jsonl", ".ndjson", ".json"))


def read_rows(path: str, schema: dict[str, bool],
              counter: ByteCounter | None = None) -> Iterator[Row | RowError]:
    if path.endswith(".parquet"):
        yield from _parquet_rows(path, schema, counter)
        return
    warned: set[str] = set()

    def check(line: int, raw: dict) -> Row | RowError:
        unknown = set(raw) - set(schema) - warned
        if unknown:
            log.warning("%s: ignoring unknown field(s) %s", path, ", ".join(sorted(unknown)))
            warned.update(unknown)
        fields = {k: ("" if v is None else str(v)).strip() for k, v in raw.items() if k in schema}
        for name, required in schema.items():
            if required and not fields.get(name):
                return RowError(path, line, name, "required field is missing or empty")
        return Row(path, line, fields)

    with _open_text(path, counter) as fh:
        if _is_jsonl(path):
            for n, text in enumerate(fh, 1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield RowError(path, n, "-", f"not valid JSON: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(obj, dict):
                    yield RowError(path, n, "-", "a JSONL line must be an object")
                    continue
                yield check(n, obj)
        else:
            yield from _csv_rows(path, fh, schema, check)


def _csv_rows(path: str, fh, schema: dict[str, bool], check) -> Iterator[Row | RowError]:
    """What csv.DictReader + check() would give, with one dict per row instead of three (this
    loop runs once per record of a bulk job: its cost is the CLI's throughput). A well-formed row
    (as many cells as the header, required cells non-empty) is built from precomputed column
    indices; any other row, and the first, takes check(), so every error and warning is the same."""
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        return
    width = len(header)
    # Columns kept, in header order; a repeated name keeps its first position and last cell,
    # as dict(zip(header, row)) does.
    index = {name: i for i, name in enumerate(header)}
    names = [n for n in dict.fromkeys(header) if n in schema]
    cells = operator.itemgetter(*(index[n] for n in names)) if names else None
    required = [n for n, req in schema.items() if req]
    # (itemgetter of a single name returns the value, not a tuple: such files take check().)
    fast = len(names) > 1 and len(required) > 1 and all(n in index for n in required)
    required_of = operator.itemgetter(*required) if fast else None
    strip = str.strip
    first = True
    for row in reader:
        if not row:  # a blank line: DictReader skips it
            continue
        line = reader.line_num
        if len(row) > width:  # more cells than header columns
            yield RowError(path, line, "-", f"{len(row) - width} cell(s) beyond the header")
            continue
        if fast and cells and required_of and not first and len(row) == width:
            fields = dict(zip(names, map(strip, cells(row))))
            if all(required_of(fields)):
                yield Row(path, line, fields)
                continue
        first = False  # check() logs the unknown columns, once
        yield check(line, dict(zip(header, row + [None] * (width - len(row)))))
