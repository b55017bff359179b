"""Inputs of a leads run as Arrow tables: settlement lines, issuance records, the site registry.

CSV and JSONL (and their .gz) are read by `tracecode.clients.files.read_rows`, the readers
`tracecode reverify` and `tracecode load` use, so a row is read, stripped, numbered and rejected
exactly as there. Parquet is read column-wise with the same semantics (values as `str()`,
stripped; rows numbered 1.. as files.py numbers them). Row checks that the bulk client makes
(settled_at, line_no, units) and the server's settlement validation are applied column-wise;
where a row or settlement fails, the reason text comes from the very function REPLAY uses.

Every row that cannot be used becomes an `InputError` (file, line, field, reason): nothing is
dropped silently. Raw insured ids are replaced by their pseudonym here, before anything else
sees them (`tracecode.server.pseudonym`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracecode.server.pseudonym import Pseudonymizer
from tracecode.server.verifier import RulesSettings
from tracecode.clients.files import ISSUANCE_FIELDS, SETTLEMENT_FIELDS, RowError, read_rows
from tracecode.clients.reverify import parse_time

# The settlement export's fields plus the optional amount (leads.md, Inputs).
LEADS_FIELDS = {**SETTLEMENT_FIELDS, "amount": False}
SITE_FIELDS = {"site_id": True, "site_kind": False, "region": False, "name": False}
SITE_KINDS = ("PHARMACY", "INSTITUTION")

# Python's str.strip() set (files.py strips every value with it): Arrow's own whitespace table
# differs (e.g. ASCII 28-31, which Python strips and a trailing GS of a GS1 scan is).
_PY_SPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}\Z")  # the verifier's id alphabet (server/verifier.py)
BATCH_ROWS = 200_000


@dataclass(frozen=True, slots=True)
class InputError:
    file: str
    line: int
    field: str
    reason: str


# The server's settlement limits, which a leads run applies the same way: the verifier's own.
Limits = RulesSettings


# ------------------------------------------------------------------ generic readers

def _strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as files.py sees it: str(value) (None -> ''), stripped."""
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        uniq = pc.unique(col)
        text = pa.array(["" if v is None else str(v) for v in uniq.to_pylist()], pa.string())
        col = pc.take(text, pc.index_in(col, value_set=uniq))
    col = pc.fill_null(col.cast(pa.string()), "")
    return pc.utf8_trim(col, characters=_PY_SPACE)


def _parquet(path: str, schema: dict[str, bool], errors: list[InputError]) -> pa.Table:
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    cols = [c for c in schema if c in names]
    table = pf.read(columns=cols)
    n = table.num_rows
    out = {c: (_strings(table[c]) if c in names else pa.chunked_array([pa.array([""] * n, pa.string())]))
           for c in schema}
    line = pa.array(range(1, n + 1), pa.int64())
    # The first missing required field in schema order, as files.py reports it.
    missing = pa.nulls(n, pa.string())
    for name in reversed([c for c, req in schema.items() if req]):
        missing = pc.if_else(pc.equal(out[name], ""), name, missing)
    t = pa.table({"line": line, **out})
    if n:
        bad = pc.is_valid(missing)
        for ln, f in zip(pc.filter(line, bad).to_pylist(), pc.filter(missing, bad).to_pylist()):
            errors.append(InputError(path, ln, f, "required field is missing or empty"))
        t = t.filter(pc.invert(bad))
    return t


def _rows(path: str, schema: dict[str, bool], errors: list[InputError]) -> pa.Table:
    """CSV / JSONL through files.py, gathered into columns batch by batch."""
    batches: list[pa.RecordBatch] = []
    cols: dict[str, list[str]] = {c: [] for c in schema}
    lines: list[int] = []

    def flush():
        if lines:
            batches.append(pa.record_batch({"line": pa.array(lines, pa.int64()),
                                            **{c: pa.array(v, pa.string()) for c, v in cols.items()}}))
            lines.clear()
            for v in cols.values():
                v.clear()
    last = 0
    try:
        for item in read_rows(path, schema):
            last = item.line
            if isinstance(item, RowError):
                errors.append(InputError(item.source, item.line, item.field, item.reason))
                continue
            lines.append(item.line)
            get = item.fields.get
            for c, v in cols.items():
                v.append(get(c, ""))
            if len(lines) >= BATCH_ROWS:
                flush()
    except (OSError, EOFError, UnicodeDecodeError, Exception) as exc:  # noqa: BLE001 - named below
        # A file that cannot be read to its end (missing, corrupt .gz, not UTF-8, bad CSV): the
        # rows read so far are kept and the rest is one error naming the file and where it broke.
        errors.append(InputError(path, last + 1 if last else 0, "-", f"cannot read the file: {exc}"))
    flush()
    empty = {"line": pa.array([], pa.int64()), **{c: pa.array([], pa.string()) for c in schema}}
    return pa.Table.from_batches(batches) if batches else pa.table(empty)


def read_table(path: str, schema: dict[str, bool], errors: list[InputError]) -> pa.Table:
    if not os.path.exists(path):
        errors.append(InputError(path, 0, "-", "cannot read the file: no such file"))
        return pa.table({"line": pa.array([], pa.int64()), **{c: pa.array([], pa.string()) for c in schema}})
    return _parquet(path, schema, errors) if path.endswith(".parquet") else _rows(path, schema, errors)


def _map_unique(col: pa.ChunkedArray | pa.Array, fn: Callable, typ: pa.DataType) -> pa.Array:
    """fn over the distinct values only (settled_at, line_no, units repeat a lot)."""
    uniq = pc.unique(col)
    mapped = pa.array([fn(v) for v in uniq.to_pylist()], typ)
    return pc.take(mapped, pc.index_in(col, value_set=uniq))


# ------------------------------------------------------------------ settlements

def _time_or_error(text: str):
    try:
        return str(parse_time(text))
    except (ValueError, OverflowError) as exc:
        return str(exc)


_CANONICAL_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$"


def settled_ms(col) -> pa.ChunkedArray:
    """settled_at -> epoch ms as text, or the parser's error text. The common form
    (YYYY-MM-DDTHH:MM:SS+HH:MM) is computed column-wise; every other value, and any the fast path
    doubts, goes through clients/reverify.py's own parser, so the result is always its result."""
    col = pa.chunked_array(col) if isinstance(col, pa.Array) else col
    fast = pc.match_substring_regex(col, _CANONICAL_TIME)
    shaped = pc.if_else(fast, col, "1970-01-01T00:00:00+00:00")  # only digits where they are cast
    sl = lambda a, b: pc.cast(pc.utf8_slice_codeunits(shaped, a, b), pa.int64())  # noqa: E731
    day = pc.strptime(pc.utf8_slice_codeunits(shaped, 0, 10), format="%Y-%m-%d", unit="s", error_is_null=True)
    hh, mm, ss, oh, om = sl(11, 13), sl(14, 16), sl(17, 19), sl(20, 22), sl(23, 25)
    # strptime rolls 2024-02-30 over into March: the day must come back as written.
    ok = pc.and_kleene(fast, pc.equal(pc.day(day), sl(8, 10)))
    for v, top in ((hh, 23), (mm, 59), (ss, 59), (oh, 23), (om, 59)):
        ok = pc.and_kleene(ok, pc.less_equal(v, top))
    ok = pc.fill_null(ok, False)
    sign = pc.if_else(pc.equal(pc.utf8_slice_codeunits(shaped, 19, 20), "-"), -1, 1)
    secs = pc.add(pc.cast(pc.cast(day, pa.int64(), safe=False), pa.int64()),
                  pc.add(pc.add(pc.multiply(hh, 3600), pc.multiply(mm, 60)), ss))
    secs = pc.subtract(secs, pc.multiply(sign, pc.add(pc.multiply(oh, 3600), pc.multiply(om, 60))))
    ms = pc.cast(pc.multiply(secs, 1000), pa.string())
    if pc.all(ok).as_py():
        return ms
    slow = _map_unique(pc.filter(col, pc.invert(ok)), _time_or_error, pa.string())
    # Put the slow answers back in their places.
    idx = pc.indices_nonzero(pc.invert(ok))
    out = ms.combine_chunks().to_pylist()
    for i, v in zip(idx.to_pylist(), slow.to_pylist()):
        out[i] = v
    return pa.chunked_array([pa.array(out, pa.string())])


def _int_or_none(text: str, low: int):
    """clients.reverify._check_row's test: digits and >= low ('' counts as '0' for units)."""
    if text.isdigit():
        v = int(text)
        return min(v, 2 ** 62) if v >= low else None
    return None


def _fen(text: str):
    """Yuan text -> integer fen (0.01 yuan), exact; None for empty; 'bad' for unreadable."""
    if not text:
        return None
    try:
        d = Decimal(text)
    except InvalidOperation:
        return "bad"
    if not d.is_finite() or abs(d) > Decimal(10) ** 15:
        return "bad"
    return str(int((d * 100).quantize(Decimal(1))))


@dataclass(slots=True)
class Pseudonyms:
    """How insured ids in the input are turned into pseudonyms (leads.md, Insured persons)."""
    pseudonymizer: Pseudonymizer | None = None
    already: bool = False  # the input carries pseudonyms already: used as they are


def read_settlements(paths: list[str], limits: Limits, pseudonyms: Pseudonyms,
                     errors: list[InputError]):
    """Per settlement file, a table of its usable lines with file index and position (one file
    in memory at a time)."""
    for fi, path in enumerate(paths):
        yield path, read_settlement_file(fi, paths, limits, pseudonyms, errors)


def read_settlement_file(fi: int, paths: list[str], limits: Limits, pseudonyms: Pseudonyms,
                         errors: list[InputError]) -> pa.Table:
    t = read_table(paths[fi], LEADS_FIELDS, errors)
    n = t.num_rows
    t = t.append_column("file_index", pa.array([fi] * n, pa.int32()))
    t = t.append_column("pos", pa.array(range(n), pa.int64()))
    return _checked(t, paths, limits, pseudonyms, errors) if n else _empty_lines()


def _checked(t: pa.Table, paths: list[str], limits: Limits, pseudonyms: Pseudonyms,
             errors: list[InputError]) -> pa.Table:
    # settled_at, line_no, units: clients/reverify.py _check_row, column-wise.
    at = settled_ms(t["settled_at"])
    at_err = pc.invert(pc.match_substring_regex(at, r"^-?\d+$"))
    line_no = _map_unique(t["line_no"], lambda v: _int_or_none(v, 1), pa.int64())
    units_text = pc.if_else(pc.equal(t["units"], ""), "0", t["units"])
    units = _map_unique(units_text, lambda v: _int_or_none(v, 0), pa.int64())
    bad_line_no, bad_units = pc.is_null(line_no), pc.is_null(units)
    bad = pc.or_(at_err, pc.or_(bad_line_no, bad_units))
    if pc.any(bad).as_py():
        names = [paths[i] for i in range(len(paths))]
        sub = t.filter(bad)
        cols = (sub["file_index"].to_pylist(), sub["line"].to_pylist(), pc.filter(at, bad).to_pylist(),
                pc.filter(at_err, bad).to_pylist(), pc.filter(bad_line_no, bad).to_pylist(),
                sub["line_no"].to_pylist(), pc.filter(units_text, bad).to_pylist())
        for fi, ln, at_v, ae, bl, lt, ut in zip(*cols):
            if ae:
                errors.append(InputError(names[fi], ln, "settled_at", at_v))
            elif bl:
                errors.append(InputError(names[fi], ln, "line_no", f"{lt!r} is not an integer >= 1"))
            else:
                errors.append(InputError(names[fi], ln, "units", f"{ut!r} is not an integer >= 0"))
        keep = pc.invert(bad)
        t, at, line_no, units = t.filter(keep), at.filter(keep), line_no.filter(keep), units.filter(keep)
    at_ms = at.cast(pa.int64())

    # Amounts (leads only, REPLAY ignores them): an unreadable amount is reported and the line is
    # still judged, without an amount, so the verdicts stay REPLAY's.
    fen = _map_unique(t["amount"], _fen, pa.string())
    bad_amount = pc.equal(fen, "bad")
    if pc.any(bad_amount).as_py():
        sub = t.filter(bad_amount)
        for fi, ln, v in zip(sub["file_index"].to_pylist(), sub["line"].to_pylist(), sub["amount"].to_pylist()):
            errors.append(InputError(paths[fi], ln, "amount",
                                     f"{v!r} is not an amount in yuan; the line is judged without it"))
    amount_fen = pc.if_else(bad_amount, pa.scalar(None, pa.string()), fen).cast(pa.int64())

    # Insured ids: pseudonymised before anything else keeps them.
    insured = t["insured_id"]
    if pc.any(pc.not_equal(insured, "")).as_py():
        if pseudonyms.already:
            shape = _map_unique(insured, lambda v: v == "" or Pseudonymizer.looks_like_pseudonym(v), pa.bool_())
            wrong = pc.invert(shape)
            if pc.any(wrong).as_py():
                sub = t.filter(wrong)
                for fi, ln in zip(sub["file_index"].to_pylist(), sub["line"].to_pylist()):
                    errors.append(InputError(paths[fi], ln, "insured_id",
                                             "not a pseudonym (KEY_ID.32 hex) although the input is said "
                                             "to carry pseudonyms; the line is judged without a person"))
                insured = pc.if_else(wrong, "", insured)
        elif pseudonyms.pseudonymizer is not None:
            insured = _map_unique(insured, pseudonyms.pseudonymizer.pseudonym, pa.string())
        else:
            raise ValueError("the settlement files carry insured ids: give --pseudonym-key FILE to "
                             "pseudonymise them, or --insured-pseudonymised if they already are")

    # The server's settlement validation (verifier.validate_settlement), per row where it is per line;
    # per settlement (site and settlement id, time, line count) in sql.py.
    tz = limits.timezone
    local = pc.cast(at_ms, pa.timestamp("ms", tz="UTC"), safe=False)
    local = pc.cast(local, pa.timestamp("ms", tz=tz))
    day = pc.add(pc.add(pc.multiply(pc.year(local), 10000), pc.multiply(pc.month(local), 100)), pc.day(local))
    id_ok = pc.and_(pc.match_substring_regex(t["site_id"], r"^[A-Za-z0-9._\-]{1,64}$"),
                    pc.match_substring_regex(t["settlement_id"], r"^[A-Za-z0-9._\-]{1,64}$"))
    from tracecode.server.verifier import MAX_PRODUCT_ID, text_problem
    product_bad = _map_unique(t["product_id"], lambda v: text_problem(v, MAX_PRODUCT_ID, "product") is not None,
                              pa.bool_())
    line_bad = pc.or_(pc.or_(product_bad, pc.greater(pc.utf8_length(t["code"]), limits.max_code_length)),
                      pc.greater(units, limits.max_units))
    inst, li = _settlement_index(t["site_id"], t["settlement_id"], line_no)
    return pa.table({
        "file_index": t["file_index"], "pos": t["pos"], "line": t["line"], "inst": inst, "li": li,
        "site_id": t["site_id"], "settlement_id": t["settlement_id"],
        "at_ms": at_ms, "day": day.cast(pa.int32()), "line_no": line_no, "code": t["code"],
        "product_id": t["product_id"], "units": units, "insured": insured, "amount_fen": amount_fen,
        "row_bad": pc.or_(pc.invert(id_ok), line_bad),
    })


def _settlement_index(site, sid, line_no) -> tuple[pa.Array, pa.Array]:
    """Per usable row (in file order) its settlement within the file, `inst` (adjacent rows of one
    site and settlement id: clients/reverify.py settlements_of, which bad rows do not interrupt),
    and `li`, its line's index in that settlement by line_no (the order REPLAY sends lines in;
    ties keep file order, as Python's stable sort does)."""
    n = len(site)
    if n == 0:
        return pa.array([], pa.int64()), pa.array([], pa.int64())
    site, sid = pa.chunked_array(site).combine_chunks(), pa.chunked_array(sid).combine_chunks()
    same = pc.and_(pc.equal(site.slice(1), site.slice(0, n - 1)), pc.equal(sid.slice(1), sid.slice(0, n - 1)))
    brk = pa.concat_arrays([pa.array([True]), pc.invert(same)])
    inst = pc.cumulative_sum(pc.cast(brk, pa.int64()))
    pos = pa.array(range(n), pa.int64())
    order = pc.sort_indices(pa.table({"inst": inst, "line_no": line_no, "pos": pos}),
                            sort_keys=[("inst", "ascending"), ("line_no", "ascending"), ("pos", "ascending")])
    inst_sorted = pc.take(inst, order)
    starts = pc.indices_nonzero(brk)
    # Sorting by inst keeps each settlement's rows together, in the same block order as `brk`.
    block_start = pc.take(starts, pc.subtract(inst_sorted, 1))
    li_sorted = pc.subtract(pos, pc.cast(block_start, pa.int64()))
    li = pc.take(li_sorted, pc.sort_indices(order))
    return inst, li


def _empty_lines() -> pa.Table:
    return pa.table({"file_index": pa.array([], pa.int32()), "pos": pa.array([], pa.int64()),
                     "line": pa.array([], pa.int64()), "inst": pa.array([], pa.int64()),
                     "li": pa.array([], pa.int64()), "site_id": pa.array([], pa.string()),
                     "settlement_id": pa.array([], pa.string()), "at_ms": pa.array([], pa.int64()),
                     "day": pa.array([], pa.int32()), "line_no": pa.array([], pa.int64()),
                     "code": pa.array([], pa.string()), "product_id": pa.array([], pa.string()),
                     "units": pa.array([], pa.int64()), "insured": pa.array([], pa.string()),
                     "amount_fen": pa.array([], pa.int64()), "row_bad": pa.array([], pa.bool_())})


def settlement_reason(site: str, sid: str, at_ms: int, lines: list[tuple[str, str, int]], config) -> str:
    """The text REPLAY reports for a settlement the server rejects: the verifier's own (a
    Verifier without a store: validation never reaches it)."""
    from tracecode.server.errors import InvalidRequest
    from tracecode.server.verifier import Line, RulesSettings, validate_settlement
    try:
        validate_settlement(RulesSettings.from_config(config), site, sid, [Line(c, p, u) for c, p, u in lines], at_ms)
    except InvalidRequest as exc:
        return str(exc)
    return "rejected by the server's settlement validation"


# ------------------------------------------------------------------ issuance

def read_issuance(paths: list[str], profile, errors: list[InputError]) -> pa.Table:
    """Issuance files -> accepted records in load order: ckey, ord, product_id, pack_units,
    expiry (YYYYMMDD or 0), status ('' = keep). Rejections as `tracecode load` makes them: the
    client's row checks (clients/admin.py), then the server's (server/issuance.py validate)."""
    parts = [read_issuance_file(fi, paths, profile, errors) for fi in range(len(paths))]
    return pa.concat_tables(parts) if parts else read_issuance_file(0, [], profile, errors)


ISSUANCE_ORD_STRIDE = 10 ** 12  # a record's load order: file index * stride + row


def read_issuance_file(fi: int, paths: list[str], profile, errors: list[InputError]) -> pa.Table:
    from tracecode import codec
    from tracecode.server.issuance import parse_expiry
    t = read_table(paths[fi], ISSUANCE_FIELDS, errors) if paths else None
    if t is not None:
        t = t.append_column("file_index", pa.array([fi] * t.num_rows, pa.int32()))
    if t is None or t.num_rows == 0:
        return pa.table({"ckey": pa.array([], pa.string()), "ord": pa.array([], pa.int64()),
                         "product_id": pa.array([], pa.string()), "pack_units": pa.array([], pa.int64()),
                         "expiry": pa.array([], pa.int64()), "status": pa.array([], pa.string()),
                         "file_index": pa.array([], pa.int32()), "line": pa.array([], pa.int64())})
    n = t.num_rows
    from tracecode.v1 import verification_pb2 as pb
    statuses = [s for s in pb.CodeStatus.keys() if s != "CODE_STATUS_UNSPECIFIED"]
    status_up = pc.utf8_upper(t["status"])
    bad_status = pc.and_(pc.not_equal(t["status"], ""), pc.invert(pc.is_in(status_up, pa.array(statuses))))
    units_text = pc.if_else(pc.equal(t["pack_units"], ""), "1", t["pack_units"])
    units = _map_unique(units_text, lambda v: int(v) if v.isdigit() and 1 <= int(v) <= 0xFFFFFFFF else None,
                        pa.int64())
    parsed = codec.parse_many(t["code"].to_pylist(), profile)
    kind = pa.array([p[codec.KIND] for p in parsed], pa.int8())
    key = pa.array([p[codec.KEY] for p in parsed], pa.string())
    inner_gtin = pa.array([p[codec.PRODUCT] for p in parsed], pa.string())
    inner_batch = pa.array([p[codec.BATCH] for p in parsed], pa.string())
    inner_exp = pa.array([p[codec.EXPIRY] for p in parsed], pa.int64())
    del parsed
    gtin = t["gtin"]
    is_gs1 = pc.equal(kind, codec.KIND_GS1)
    gtin_bad = pc.and_(pc.not_equal(gtin, ""), pc.if_else(
        is_gs1, pc.not_equal(pc.utf8_lpad(gtin, 14, "0"), inner_gtin),
        pc.invert(pc.match_substring_regex(gtin, r"^[0-9]{1,14}$"))))
    exp_given = pc.not_equal(t["expiry"], "")

    def exp_or_bad(v):
        try:
            return parse_expiry(v) if v else 0
        except ValueError:
            return -1
    exp = _map_unique(t["expiry"], exp_or_bad, pa.int64())
    exp_bad = pc.or_(pc.equal(exp, -1), pc.and_(exp_given, pc.and_(pc.not_equal(inner_exp, 0),
                                                                     pc.not_equal(exp, inner_exp))))
    batch_bad = pc.and_(pc.not_equal(t["batch"], ""),
                        pc.and_(pc.not_equal(inner_batch, ""), pc.not_equal(t["batch"], inner_batch)))
    bad = pc.or_kleene(bad_status, pc.is_null(units))
    bad = pc.or_kleene(bad, pc.equal(key, ""))
    bad = pc.or_kleene(bad, pc.or_(gtin_bad, pc.or_(exp_bad, batch_bad)))
    bad = pc.or_kleene(bad, pc.greater(pc.fill_null(units, 0), 100000))
    from tracecode.server.issuance import TEXT_LIMITS
    from tracecode.server.verifier import text_problem
    for name, limit in TEXT_LIMITS:
        text_bad = _map_unique(t[name], lambda v, limit=limit, name=name: text_problem(
            v, limit, "", required=name == "product_id") is not None, pa.bool_())
        bad = pc.or_kleene(bad, text_bad)
    bad = pc.fill_null(bad, True)
    if pc.any(bad).as_py():
        for row in t.filter(bad).to_pylist():
            f, reason = _issuance_reason(row, profile)
            errors.append(InputError(paths[row["file_index"]], row["line"], f, reason))
    keep = pc.invert(bad)
    expiry = pc.if_else(exp_given, exp, inner_exp)
    status = pc.if_else(pc.equal(t["status"], ""), "", status_up)
    out = pa.table({"ckey": key, "ord": pa.array(range(fi * ISSUANCE_ORD_STRIDE, fi * ISSUANCE_ORD_STRIDE + n),
                                                   pa.int64()), "product_id": t["product_id"],
                    "pack_units": units, "expiry": expiry, "status": status,
                    "file_index": t["file_index"], "line": t["line"]})
    return out.filter(keep)


def load_check(fields: dict, profile) -> tuple:
    """One issuance row as `tracecode load` judges it, by the very functions it uses: the
    client's row check, the API's conversion, the server's validate(). The stored tuple, or
    ValueError("field: reason")."""
    from tracecode.clients.admin import FieldError, record_of
    from tracecode.server.api.convert import issuance_input
    from tracecode.server.issuance import validate_record
    try:
        rec = record_of(fields)
    except FieldError as exc:
        raise ValueError(f"{exc.field}: {exc.reason}") from None
    return validate_record(issuance_input(rec), profile)


def _issuance_reason(row: dict, profile) -> tuple[str, str]:
    """The field and text `tracecode load` reports for a rejected row."""
    try:
        load_check({k: v for k, v in row.items() if k in ISSUANCE_FIELDS}, profile)
    except ValueError as exc:
        field, _, reason = str(exc).partition(": ")
        return field, reason
    return "-", "rejected"


# ------------------------------------------------------------------ sites

def read_sites(path: str | None, errors: list[InputError]) -> pa.Table:
    if not path:
        return pa.table({"site_id": pa.array([], pa.string()), "site_kind": pa.array([], pa.string()),
                         "region": pa.array([], pa.string()), "name": pa.array([], pa.string())})
    t = read_table(path, SITE_FIELDS, errors)
    kind = pc.utf8_upper(t["site_kind"])
    wrong = pc.and_(pc.not_equal(kind, ""), pc.invert(pc.is_in(kind, pa.array(SITE_KINDS))))
    for ln, v in zip(t.filter(wrong)["line"].to_pylist(), t.filter(wrong)["site_kind"].to_pylist()):
        errors.append(InputError(path, ln, "site_kind", f"{v!r} is not PHARMACY or INSTITUTION; kind unknown"))
    kind = pc.if_else(wrong, "", kind)
    t = pa.table({"line": t["line"], "site_id": t["site_id"], "site_kind": kind, "region": t["region"],
                  "name": t["name"]})
    # A site listed twice: the first row counts (later ones are reported).
    seen, keep = set(), []
    for ln, s in zip(t["line"].to_pylist(), t["site_id"].to_pylist()):
        keep.append(s not in seen)
        if s in seen:
            errors.append(InputError(path, ln, "site_id", f"site {s} is listed again; the first row counts"))
        seen.add(s)
    return t.filter(pa.array(keep, pa.bool_())).drop_columns(["line"])
