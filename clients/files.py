"""Streaming readers of the operators' files (../shared/spec/files.md): CSV (UTF-8, header row,
RFC 4180) or JSONL, `.gz` read transparently. Rows are yielded one by one, never loaded whole.

A row missing a required field comes out as a RowError naming file, line and field: the caller
counts and reports it; nothing is skipped silently. Unknown columns produce one warning.

A damaged row never costs the rows after it (issue 23): bytes that are not UTF-8 are read as
lone surrogates (surrogateescape) and the row holding them is a RowError naming its field; a
field over the CSV limit is a RowError and the next line is read; a quoted field cannot run
past the end of its line (no field of files.md may hold a line break), so an unterminated quote
is a RowError for its line and the next line is read as a new row. One physical line is at most
one row, so every line is either a row or a RowError. A file that cannot be read at all, or not
to its end (missing, not readable, a truncated or corrupt .gz, a Parquet file that is not one),
raises InputFileError: its rows cannot be accounted for, so the caller stops with that message.
"""
from __future__ import annotations

import csv
import gzip
import io
import typing
import json
import logging
import operator
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

log = logging.getLogger("tracecode.files")

ISSUANCE_FIELDS = {"code": True, "product_id": True, "gtin": False, "batch": False, "expiry": False,
                   "pack_units": False, "manufacturer": False, "status": False}
SETTLEMENT_FIELDS = {"site_id": True, "settlement_id": True, "settled_at": True, "line_no": True,
                     "code": True, "product_id": True, "units": False, "insured_id": False}
# What the readers of settlement files read: the export's fields with the optional amount
# (files.md), so `tracecode reverify` checks it as the leads engine does (rules/rows.py).
# SETTLEMENT_FIELDS stays the export's columns of the flagged report.
SETTLEMENT_READ_FIELDS = {**SETTLEMENT_FIELDS, "amount": False}


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


# The field of a RowError about the row as a whole (a JSON line that is not an object, cells
# beyond the header, an unterminated quote). Not a dash: a cell starting with "-" is neutralised
# in a CSV report (rules/cells.py), and a placeholder should read as itself.
ROW_FIELD = "row"


class InputFileError(OSError):
    """A file that cannot be read, or not to its end: one line naming the file and why. An
    OSError, so callers that already stop on a file's OSError (`tracecode load`) still do."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # args as given: it pickles (the leads engine's workers raise it)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: cannot read the file: {self.reason}"


# What reading a damaged file raises (gzip: BadGzipFile is an OSError, a truncated member is an
# EOFError, a corrupt block a zlib.error).
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    if isinstance(exc, EOFError):
        return "the compressed data ends early (a truncated .gz?)"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_readable(path: str) -> None:
    """InputFileError unless path is a file this process can open for reading (checked before a
    run writes anything)."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise InputFileError(path, _reason(exc)) from None


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
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate (U+DC80-U+DCFF) in its
    # field instead of stopping the file; the row is then reported (_SURROGATE).
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


_SURROGATE = re.compile("[\udc80-\udcff]")
UNDECODABLE = "bytes that are not UTF-8 at character {}"


_ANY_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_TEXT = "not UTF-8 text (a byte that is not UTF-8, or a lone surrogate) at character {}"


def _json_surrogate(obj: dict) -> tuple[str, str] | None:
    """(field, reason) of the first key or string value of a JSON object holding a surrogate."""
    for k, v in obj.items():
        if (m := _ANY_SURROGATE.search(k)) is not None:
            return ROW_FIELD, NOT_TEXT.format(m.start() + 1)
        if isinstance(v, str) and (m := _ANY_SURROGATE.search(v)) is not None:
            return k, NOT_TEXT.format(m.start() + 1)
    return None


def _undecodable(cells, names) -> RowError | None:
    """The first cell holding an undecodable byte, as (field, reason) material, or None."""
    for i, cell in enumerate(cells):
        if cell and not cell.isascii():
            m = _SURROGATE.search(cell)
            if m:
                return RowError("", 0, names[i] if i < len(names) else ROW_FIELD, UNDECODABLE.format(m.start() + 1))
    return None


def _parquet_rows(path: str, schema: dict[str, bool], counter: ByteCounter | None):
    """Parquet (optional: pip install 'tracecode[parquet]'); row numbers are 1-based data rows."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"{path}: reading Parquet needs pyarrow: pip install 'tracecode[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - Arrow raises its own kinds for a file that is not Parquet
        raise InputFileError(path, f"not a Parquet file ({type(exc).__name__})") from None
    names = set(pf.schema_arrow.names)
    unknown = names - set(schema)
    if unknown:
        log.warning("%s: ignoring unknown field(s) %s", path, _names_for_log(unknown))
    cols = [c for c in schema if c in names]
    line = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=cols)
        except Exception as exc:  # noqa: BLE001 - a damaged row group: the file cannot be read to its end
            raise InputFileError(path, f"row group {group} is damaged ({type(exc).__name__})") from None
        if counter:
            counter.read += pf.metadata.row_group(group).total_byte_size
        for raw in table.to_pylist():
            line += 1
            fields = {k: ("" if v is None else str(v)).strip() for k, v in raw.items()}
            missing = next((n for n, req in schema.items() if req and not fields.get(n)), None)
            yield RowError(path, line, missing, "required field is missing or empty") if missing \
                else Row(path, line, fields)


_COLUMN_NAME = re.compile(r"[a-z_]{1,40}\Z")


def _names_for_log(names) -> str:
    """Unknown column names for the warning, the ones shaped like column names (snake_case
    letters, as files.md's are) by name. A file without a header row has its first data row
    taken for one, and that row's insured id must not reach a log: any other name is counted."""
    shown = sorted(n for n in names if _COLUMN_NAME.match(n))
    hidden = len(names) - len(shown)
    if not hidden:
        return ", ".join(shown)
    rest = f"{hidden} not shaped like a column name (not shown)"
    return f"{', '.join(shown)} and {rest}" if shown else rest


def _is_jsonl(path: str) -> bool:
    base = path[:-3] if path.endswith(".gz") else path
    return base.endswith((".jsonl", ".ndjson", ".json"))


def read_rows(path: str, schema: dict[str, bool],
              counter: ByteCounter | None = None) -> Iterator[Row | RowError]:
    """Every row of the file as a Row or a RowError (module docstring); InputFileError when the
    file cannot be read to its end."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path, schema, counter)
        return
    try:
        yield from _text_rows(path, schema, counter)
    except _READ_ERRORS as exc:
        raise InputFileError(path, _reason(exc)) from None


def _text_rows(path: str, schema: dict[str, bool], counter: ByteCounter | None) -> Iterator[Row | RowError]:
    warned: set[str] = set()

    def check(line: int, raw: dict) -> Row | RowError:
        unknown = set(raw) - set(schema) - warned
        if unknown:
            log.warning("%s: ignoring unknown field(s) %s", path, _names_for_log(unknown))
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
                    yield RowError(path, n, ROW_FIELD, f"not valid JSON: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(obj, dict):
                    yield RowError(path, n, ROW_FIELD, "a JSONL line must be an object")
                    continue
                # Bytes that are not UTF-8 (read as surrogates), or a \uD800-\uDFFF escape that
                # JSON allows and no text may hold (Arrow and protobuf refuse it later).
                if (not text.isascii() or "\\u" in text) and (bad := _json_surrogate(obj)) is not None:
                    yield RowError(path, n, *bad)
                    continue
                yield check(n, obj)
        else:
            yield from _csv_rows(path, fh, schema, check)


class _Cursor:
    """Where the CSV reader is: the physical line of the current row, whether csv asked for a
    second line of it (a quoted field running past its line), whether the line held bytes that
    are not UTF-8, and the line's text (to name an over-long field)."""
    __slots__ = ("line", "fresh", "spanned", "text")

    def __init__(self):
        self.line, self.fresh, self.spanned, self.text = 0, True, False, ""


def _physical_lines(fh, cur: _Cursor):
    """The file's lines for csv.reader, one row per line at most. csv asks for another line
    before it has yielded the row only inside a quoted field; then this yields '"\n' instead,
    which closes the quote and ends the row (csv's own state machine: a quote inside a quoted
    field, then end of line), marks the row as spanned, and gives the real line next time, as
    the first line of a new row. A generator, not an iterator class: this runs once per line of
    a bulk job."""
    for text in fh:
        if not cur.fresh:
            cur.spanned = True
            yield '"\n'
        cur.fresh = False
        cur.line += 1
        cur.text = text
        yield text
    if not cur.fresh:  # the last line ends inside a quoted field
        cur.spanned = True
        yield '"\n'


def _over_limit_cell(text: str, limit: int) -> int | None:
    """Index of the first cell of a line longer than limit (the rare path of a csv.Error)."""
    cell, length, quoted = 0, 0, False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            cell, length = cell + 1, 0
        else:
            length += 1
            if length > limit:
                return cell
    return None


def _csv_rows(path: str, fh, schema: dict[str, bool], check) -> Iterator[Row | RowError]:
    """What csv.DictReader + check() would give, with one dict per row instead of three (this
    loop runs once per record of a bulk job: its cost is the CLI's throughput). A well-formed row
    (as many cells as the header, required cells non-empty) is built from precomputed column
    indices; any other row, and the first, takes check(), so every error and warning is the same.
    Damaged rows (module docstring) are RowErrors and reading goes on with the next line."""
    cur = _Cursor()
    reader = csv.reader(_physical_lines(fh, cur))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputFileError(path, f"the header row is unreadable ({exc})") from None
    if header is None:
        return
    if cur.spanned:  # every row would be read against a garbled header: the file is unusable
        raise InputFileError(path, "the header row has an unterminated quote")
    cur.fresh = True
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
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:  # a field over csv.field_size_limit(): the rest of its line is skipped
            cur.fresh, cur.spanned = True, False
            limit = csv.field_size_limit()
            i = _over_limit_cell(cur.text, limit)
            yield RowError(path, cur.line, header[i] if i is not None and i < width else ROW_FIELD,
                           f"a field longer than {limit:,} characters")
            continue
        cur.fresh = True
        line = cur.line
        if cur.spanned:
            cur.spanned = False
            yield RowError(path, line, ROW_FIELD, "a quoted field runs past the end of its line (an unterminated "
                                            "quote?); the next line is read as a new row")
            continue
        if not row:  # a blank line: DictReader skips it
            continue
        if len(row) > width:  # more cells than header columns
            yield RowError(path, line, ROW_FIELD, f"{len(row) - width} cell(s) beyond the header")
            continue
        if not cur.text.isascii() and _SURROGATE.search(cur.text):
            bad = _undecodable(row, header)
            if bad is not None:
                yield RowError(path, line, bad.field, bad.reason)
                continue
        if fast and cells and required_of and not first and len(row) == width:
            fields = dict(zip(names, map(strip, cells(row))))
            if all(required_of(fields)):
                yield Row(path, line, fields)
                continue
        first = False  # check() logs the unknown columns, once
        yield check(line, dict(zip(header, row + [None] * (width - len(row)))))
