"""Inputs of a leads run as Arrow tables: settlement lines, issuance records, the site registry.

CSV and JSONL (and their .gz) are read by `tracecode.clients.files.read_rows`, the readers
`tracecode reverify` and `tracecode load` use, so a row is read, stripped, numbered and rejected
exactly as there. Parquet is read column-wise with the same semantics (values as `str()`,
stripped; rows numbered 1.. as files.py numbers them). Row checks that the bulk client makes
(settled_at, line_no, units) and the server's settlement validation are applied column-wise;
where a row or settlement fails, the reason text comes from the very function REPLAY uses.

Every row that cannot be used becomes an `InputError` (file, line, field, reason): nothing is
dropped silently, and a row is either usable or an error, never both. The row rules (limits,
order, texts) are `tracecode.rules.rows`, the ones `tracecode reverify` applies row by row; here
they run column-wise or once per distinct value. A file that cannot be read to its end raises
`InputFileError` (the run stops: its rows cannot be accounted for). Raw insured ids are
validated (`tracecode.rules.insured`) and replaced by their pseudonym here, before anything else
sees them (`tracecode.rules.pseudonym`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracecode.rules import rows
from tracecode.rules.pseudonym import Pseudonymizer
from tracecode.rules.text import text_problem
from tracecode.rules.settlement import RulesSettings
from tracecode.clients.files import (ISSUANCE_FIELDS, SETTLEMENT_READ_FIELDS, InputFileError, RowError,
                                     ROW_FIELD, check_readable, read_rows)

# The settlement export's fields, amount included (files.md), as tracecode reverify reads them.
LEADS_FIELDS = SETTLEMENT_READ_FIELDS
SITE_FIELDS = {"site_id": True, "site_kind": False, "region": False, "name": False}
SITE_KINDS = ("PHARMACY", "INSTITUTION")
SITE_TEXT_LIMITS = (("region", 32), ("name", 200))

# Python's str.strip() set (files.py strips every value with it): Arrow's own whitespace table
# differs (e.g. ASCII 28-31, which Python strips and a trailing GS of a GS1 scan is). Every
# whitespace character Unicode has lies below U+3001 (the last is U+3000, the ideographic
# space): scanning all 1.1M code points cost 0.8 s at every start, scanning these 12,289 none
# (tests/test_leads_inputs.py holds the two equal under the running Python).
PY_SPACE_BOUND = 0x3001
PY_SPACE = "".join(chr(c) for c in range(PY_SPACE_BOUND) if chr(c).isspace())
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
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        try:  # str() once per distinct value
            uniq = pc.unique(col)
            text = pa.array(["" if v is None else str(v) for v in uniq.to_pylist()], pa.string())
            col = pc.take(text, pc.index_in(col, value_set=uniq))
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid):
            # Types without a hash kernel (lists, structs, maps): str() of every value, as files.py does.
            col = pa.chunked_array([pa.array(["" if v is None else str(v) for v in col.to_pylist()], pa.string())])
    col = col.cast(pa.string())
    if col.null_count:  # fill_null copies the column even when it has nothing to fill
        col = pc.fill_null(col, "")
    return pc.utf8_trim(col, characters=PY_SPACE)


def parquet_rows(path: str) -> tuple[int, list[int]]:
    """A Parquet file's rows and the rows of each of its row groups (from its footer only), so a
    large file can be read in parts (staging.py); InputFileError for a file that is not Parquet."""
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # noqa: BLE001 - Arrow raises its own kinds for a file that is not Parquet
        raise InputFileError(path, f"not a readable Parquet file ({type(exc).__name__})") from None
    return meta.num_rows, [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


# Whole Parquet files read once by the parent before it forks the staging workers, which then
# take their parts from it (the pages shared, not copied) instead of each decoding the file again
# (staging.py). Only set in that parent, for the files it reads in parts.
PRELOADED: dict[str, pa.Table] = {}


def preload(path: str, schema: dict[str, bool]) -> None:
    """Read a Parquet file's columns of `schema` into PRELOADED (staging.py, before forking)."""
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    PRELOADED[path] = pf.read(columns=[c for c in schema if c in names])


def _parquet(path: str, schema: dict[str, bool], errors: list[InputError], part: tuple[int, int] | None = None) -> pa.Table:
    """part (start, stop): only the file's rows start..stop-1 (0-based), numbered start+1.. as the
    whole file numbers them. Only the row groups that hold them are decoded (or none: a file in
    PRELOADED is sliced)."""
    try:
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        cols = [c for c in schema if c in names]
        pre = PRELOADED.get(path)
        if pre is not None and part is not None and set(cols) <= set(pre.column_names):
            table = pre.select(cols).slice(part[0], part[1] - part[0])
        elif part is None:
            table = pf.read(columns=cols)
        else:
            groups: list[int] = []
            skip, at = 0, 0
            for g in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if at + rows > part[0] and at < part[1]:
                    if not groups:
                        skip = part[0] - at
                    groups.append(g)
                at += rows
            table = pf.read_row_groups(groups, columns=cols).slice(skip, part[1] - part[0])
    except Exception as exc:  # noqa: BLE001 - Arrow raises its own kinds for a file that is not Parquet
        raise InputFileError(path, f"not a readable Parquet file ({type(exc).__name__})") from None
    n = table.num_rows
    first = part[0] if part else 0
    out = {c: (_strings(table[c]) if c in names else pa.chunked_array([pa.array([""] * n, pa.string())]))
           for c in schema}
    line = pa.array(range(first + 1, first + n + 1), pa.int64())
    # The first missing required field in schema order, as files.py reports it.
    missing = pa.nulls(n, pa.string())
    for name in reversed([c for c, req in schema.items() if req]):
        missing = pc.if_else(pc.equal(out[name], ""), name, missing)
    t = pa.table({"line": line, **out})
    if n:
        bad = pc.is_valid(missing)
        if missing.null_count < n:  # filtering a whole table that has nothing to drop costs a copy
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
    # read_rows gives every line as a row or an error (bad bytes, over-long fields, unterminated
    # quotes included) and raises InputFileError for a file it cannot read to its end.
    for item in read_rows(path, schema):
        if isinstance(item, RowError):
            errors.append(InputError(item.source, item.line, item.field, item.reason))
            continue
        lines.append(item.line)
        get = item.fields.get
        for c, v in cols.items():
            v.append(get(c, ""))
        if len(lines) >= BATCH_ROWS:
            flush()
    flush()
    empty = {"line": pa.array([], pa.int64()), **{c: pa.array([], pa.string()) for c in schema}}
    return pa.Table.from_batches(batches) if batches else pa.table(empty)


def read_table(path: str, schema: dict[str, bool], errors: list[InputError],
               part: tuple[int, int] | None = None) -> pa.Table:
    """A file's usable rows as string columns (+ line); the rest into errors. InputFileError
    for a file that is missing or cannot be read to its end. part: rows start..stop-1 of a
    Parquet file only (CSV and JSONL are read whole: their line numbers need every line before)."""
    check_readable(path)
    if path.endswith(".parquet"):
        return _parquet(path, schema, errors, part)
    if part is not None:
        raise ValueError(f"{path}: only a Parquet file is read in parts")
    return _rows(path, schema, errors)


def _map_unique(col: pa.ChunkedArray | pa.Array, fn: Callable, typ: pa.DataType) -> pa.Array:
    """fn over the distinct values only (settled_at, line_no, units repeat a lot)."""
    uniq = pc.unique(col)
    mapped = pa.array([fn(v) for v in uniq.to_pylist()], typ)
    return pc.take(mapped, pc.index_in(col, value_set=uniq))


# ------------------------------------------------------------------ settlements

_CANONICAL_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$"


def settled_ms(col) -> pa.ChunkedArray:
    """settled_at -> epoch ms as text, or the rule's error text. The common form
    (YYYY-MM-DDTHH:MM:SS+HH:MM) is computed column-wise; every other value, and any the fast path
    doubts, goes through rules/rows.py's own parser (tracecode reverify's), so the result is
    always its result."""
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
    slow = _map_unique(pc.filter(col, pc.invert(ok)), lambda v: str(rows.settled_at_ms(v)), pa.string())
    # Put the slow answers back in their places.
    idx = pc.indices_nonzero(pc.invert(ok))
    out = ms.combine_chunks().to_pylist()
    for i, v in zip(idx.to_pylist(), slow.to_pylist()):
        out[i] = v
    return pa.chunked_array([pa.array(out, pa.string())])


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
                         errors: list[InputError], part: tuple[int, int] | None = None) -> pa.Table:
    """part (start, stop): a Parquet file's rows start..stop-1 only. `pos` and `inst` then start
    at `start` (the whole file's start at 0), so the parts of one file never share a value and
    keep the file's order; they need not be dense (sql.py only orders, groups and joins by them).
    A settlement must not run across parts: staging.py checks that and reads the file whole if
    one does."""
    t = read_table(paths[fi], LEADS_FIELDS, errors, part)
    n = t.num_rows
    first = part[0] if part else 0
    t = t.append_column("file_index", pa.array([fi] * n, pa.int32()))
    t = t.append_column("pos", pa.array(range(first, first + n), pa.int64()))
    return _checked(t, paths, limits, pseudonyms, errors, first) if n else empty_lines()


def _reason_column(values: pa.ChunkedArray, fn: Callable[[str], str | None]) -> pa.Array:
    """fn (a rules/rows.py check: reason or None) over the distinct values of a column."""
    return _map_unique(values, fn, pa.string())


def _checked(t: pa.Table, paths: list[str], limits: Limits, pseudonyms: Pseudonyms,
             errors: list[InputError], inst_base: int = 0) -> pa.Table:
    # The row rules of rules/rows.py (tracecode reverify's check_row), column-wise: per field a
    # reason (null when the value passes); a row is refused with its first reason in
    # rows.FIELD_ORDER, as check_row reports it.
    at = settled_ms(t["settled_at"])
    at_ok = pc.match_substring_regex(at, r"^-?\d+$")
    id_ok = {f: pc.match_substring_regex(t[f], "^" + rows.ID_PATTERN + "$") for f in ("site_id", "settlement_id")}
    units_text = pc.if_else(pc.equal(t["units"], ""), "0", t["units"])
    reasons = {
        "site_id": pc.if_else(id_ok["site_id"], pa.scalar(None, pa.string()), rows.ID_REASON),
        "settlement_id": pc.if_else(id_ok["settlement_id"], pa.scalar(None, pa.string()), rows.ID_REASON),
        "settled_at": pc.if_else(at_ok, pa.scalar(None, pa.string()), at),
        "line_no": _reason_column(t["line_no"], lambda v: rows.check_int(v, 1)),
        "code": pc.if_else(pc.greater(pc.utf8_length(t["code"]), rows.MAX_CODE), rows.CODE_REASON,
                           pa.scalar(None, pa.string())),
        "product_id": _reason_column(t["product_id"], rows.check_product),
        "units": _reason_column(units_text, rows.check_units),
    }
    # Insured ids: validated and normalised by rules/insured.py's rule (column-wise for the common
    # shapes, per distinct value otherwise: insured_normalised), pseudonymised below once the
    # refused rows are out; an input that carries pseudonyms has only their shape checked.
    insured = t["insured_id"]
    has_insured = pc.any(pc.not_equal(insured, "")).as_py()
    if has_insured and pseudonyms.already:
        reasons["insured_id"] = _reason_column(insured, lambda v: None if v == "" or Pseudonymizer.looks_like_pseudonym(v)
                                               else "not a pseudonym (KEY_ID.32 hex) although the input is said "
                                                    "to carry pseudonyms")
    elif has_insured:
        normalised = insured_normalised(insured)
        is_problem = pc.starts_with(normalised, PROBLEM_MARK)
        reasons["insured_id"] = pc.if_else(is_problem, pc.utf8_slice_codeunits(normalised, len(PROBLEM_MARK)),
                                           pa.scalar(None, pa.string()))
        insured = pc.if_else(is_problem, "", normalised)
    fen_or_problem = _map_unique(t["amount"], _fen_or_problem, pa.string())
    amount_bad = pc.starts_with(fen_or_problem, PROBLEM_MARK)
    reasons["amount"] = pc.if_else(amount_bad, pc.utf8_slice_codeunits(fen_or_problem, len(PROBLEM_MARK)),
                                   pa.scalar(None, pa.string()))
    field = pa.nulls(t.num_rows, pa.string())
    reason = pa.nulls(t.num_rows, pa.string())
    for name in reversed(rows.FIELD_ORDER):  # the first failing field in FIELD_ORDER wins
        if name in reasons:
            r = pc.fill_null(pc.is_valid(reasons[name]), False)
            field = pc.if_else(r, name, field)
            reason = pc.if_else(r, reasons[name], reason)
    bad = pc.is_valid(field)
    if pc.any(bad).as_py():
        sub = t.filter(bad)
        for fi, ln, f, why in zip(sub["file_index"].to_pylist(), sub["line"].to_pylist(),
                                  pc.filter(field, bad).to_pylist(), pc.filter(reason, bad).to_pylist()):
            errors.append(InputError(paths[fi], ln, f, why))
        keep = pc.invert(bad)
        t, at, insured, fen_or_problem = t.filter(keep), at.filter(keep), insured.filter(keep), fen_or_problem.filter(keep)
        units_text = units_text.filter(keep)
    at_ms = at.cast(pa.int64())
    line_no = pc.cast(t["line_no"], pa.int64())
    units = pc.cast(units_text, pa.int64())
    amount_fen = fen_or_problem.cast(pa.int64())

    # Insured ids (valid and normalised by now) become pseudonyms before anything else keeps them.
    if has_insured and not pseudonyms.already and pc.any(pc.not_equal(insured, "")).as_py():
        if pseudonyms.pseudonymizer is None:
            raise ValueError("the settlement files carry insured ids: give --pseudonym-key FILE to "
                             "pseudonymise them, or --insured-pseudonymised if they already are")
        uniq = pc.unique(insured)
        mapped = pseudonyms_of(pseudonyms.pseudonymizer, uniq.combine_chunks() if isinstance(uniq, pa.ChunkedArray)
                                else uniq)
        insured = pc.take(mapped, pc.index_in(insured, value_set=uniq))

    # The server's settlement validation (verifier.validate_settlement) where it is per line and
    # depends on the server's configuration (code length, units); per settlement (line count,
    # time range) in sql.py. Ids and product ids were checked per row above, by the same rules.
    tz = limits.timezone
    local = pc.cast(at_ms, pa.timestamp("ms", tz="UTC"), safe=False)
    local = pc.cast(local, pa.timestamp("ms", tz=tz))
    day = pc.add(pc.add(pc.multiply(pc.year(local), 10000), pc.multiply(pc.month(local), 100)), pc.day(local))
    line_bad = pc.or_(pc.greater(pc.utf8_length(t["code"]), limits.max_code_length),
                      pc.greater(units, limits.max_units))
    inst, li = _settlement_index(t["site_id"], t["settlement_id"], line_no)
    if inst_base:
        inst = pc.add(inst, inst_base)
    return pa.table({
        "file_index": t["file_index"], "pos": t["pos"], "line": t["line"], "inst": inst, "li": li,
        "site_id": t["site_id"], "settlement_id": t["settlement_id"],
        "at_ms": at_ms, "day": day.cast(pa.int32()), "line_no": line_no, "code": t["code"],
        "product_id": t["product_id"], "units": units, "insured": insured, "amount_fen": amount_fen,
        "row_bad": line_bad,
    })


# Pseudonyms this process has computed, per key: (normalised ids, their pseudonyms), two Arrow
# columns. A worker process stages many files of one history (staging.py), and the same persons
# come back in every month: one HMAC per person and process instead of one per person and file.
# Only in memory, only for the worker's life (the read stage): nothing of it is written.
_KNOWN: dict[str, tuple[pa.Array, pa.Array]] = {}
KNOWN_MAX = 2_000_000  # ids kept per key (about 60 bytes each); past it new ones are not kept


def pseudonyms_of(pz: Pseudonymizer, ids: pa.Array) -> pa.Array:
    """pz.pseudonym_many over distinct normalised ids (insured_normalised's), the ones this process has seen before
    taken from _KNOWN (the same strings: it holds pseudonym_many's own answers)."""
    tag = f"{pz.key_id}:{pz.fingerprint()}"
    keys, values = _KNOWN.get(tag, (pa.array([], pa.string()), pa.array([], pa.string())))
    idx = pc.index_in(ids, value_set=keys)
    unseen = pc.is_null(idx)
    fresh = pc.filter(ids, unseen)
    computed = pa.array(pz.pseudonym_many_normalised(fresh.to_pylist()), pa.string())
    if len(keys) + len(fresh) <= KNOWN_MAX and len(fresh):
        _KNOWN[tag] = (pa.concat_arrays([keys, fresh]), pa.concat_arrays([values, computed]))
    if not len(keys):
        return computed
    return pc.replace_with_mask(pc.take(values, idx), unseen, computed)


def insured_normalised(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """rows.check_insured_id over a column: the normalised id, or PROBLEM_MARK + the rule. The common
    ids (ASCII letters and digits only: a valid resident id, a 15-digit one, or 1-64 letters and
    digits that do not look like a resident id) are recognised column-wise, the GB 11643 check
    character included; every other value, and any the fast path does not accept, goes through
    rows.check_insured_id once per distinct value, so the result is always its result (a test
    compares them on random ids)."""
    col = pa.chunked_array(col) if isinstance(col, pa.Array) else col
    plain = pc.match_substring_regex(col, r"^[A-Za-z0-9]{1,64}$")
    up = pc.utf8_upper(col)
    resident_shaped = pc.match_substring_regex(up, r"^[0-9]{13,19}[0-9X]$")
    r18 = pc.fill_null(pc.match_substring_regex(up, r"^[0-9]{17}[0-9X]$"), False)
    ok18 = _resident_check_ok(up, r18)
    ok15 = pc.match_substring_regex(up, r"^[0-9]{15}$")
    fast = pc.and_(plain, pc.or_(pc.or_(ok18, ok15), pc.invert(resident_shaped)))
    slow_rows = pc.and_(pc.invert(fast), pc.not_equal(col, ""))
    out = pc.if_else(fast, up, "")
    if not pc.any(slow_rows).as_py():
        return out
    slow = _map_unique(pc.filter(col, slow_rows), _normalised_or_problem, pa.string())
    out_list = out.combine_chunks().to_pylist()
    for i, v in zip(pc.indices_nonzero(slow_rows).to_pylist(), slow.to_pylist()):
        out_list[i] = v
    return pa.chunked_array([pa.array(out_list, pa.string())])


def _resident_check_ok(up: pa.ChunkedArray, r18: pa.ChunkedArray) -> pa.Array:
    """Per row: an 18-character resident id (r18) whose last character is its GB 11643 check
    character. Over the ids' bytes as an (n, 18) matrix: one weighted sum per row in numpy,
    where string slices per digit took a second for a million ids."""
    import numpy as np
    n = len(up)
    ok = np.zeros(n, dtype=bool)
    sel = pc.filter(up, r18).combine_chunks()
    if len(sel):
        fixed = sel.cast(pa.binary(18))
        data = np.frombuffer(fixed.buffers()[1], np.uint8)[fixed.offset * 18:(fixed.offset + len(fixed)) * 18]
        data = data.reshape(-1, 18)
        # Column by column in 16 bits (a sum is at most 17 * 57 * 10): a (n, 17) int64 copy
        # cost more than the rest of the check.
        sums = np.zeros(len(data), np.uint16)
        for i, w in enumerate(rows.RESIDENT_WEIGHTS):
            sums += (data[:, i] - ord("0")).astype(np.uint16) * w
        table = np.frombuffer(rows.RESIDENT_CHECK.encode("ascii"), np.uint8)
        ok[pc.indices_nonzero(r18).to_numpy()] = table[sums % 11] == data[:, 17]
    return pa.array(ok)


# A mapped value that is a rule's reason, not a value: no id, amount or fen starts with a NUL.
PROBLEM_MARK = "\x00"


def _normalised_or_problem(raw: str) -> str:
    try:
        return rows.check_insured_id(raw)
    except rows.RowProblem as exc:
        return PROBLEM_MARK + exc.reason


def _fen_or_problem(text: str) -> str | None:
    try:
        fen = rows.amount_fen(text)
    except rows.RowProblem as exc:
        return PROBLEM_MARK + exc.reason
    return None if fen is None else str(fen)


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


def empty_lines() -> pa.Table:
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
    from tracecode.rules.settlement import Line, settlement_problems
    bad = settlement_problems(RulesSettings.from_config(config), site, sid, [Line(c, p, u) for c, p, u in lines], at_ms)
    # The text of the server's InvalidRequest for these violations (server/errors.py).
    return "; ".join(f"{f}: {d}" for f, d in bad) if bad else "rejected by the server's settlement validation"


# ------------------------------------------------------------------ issuance

def read_issuance(paths: list[str], profile, errors: list[InputError]) -> pa.Table:
    """Issuance files -> accepted records in load order: ckey, ord, product_id, pack_units,
    expiry (YYYYMMDD or 0), status ('' = keep). Rejections as `tracecode load` makes them: the
    client's row checks (clients/admin.py), then the server's (server/issuance.py validate)."""
    parts = [read_issuance_file(fi, paths, profile, errors) for fi in range(len(paths))]
    return pa.concat_tables(parts) if parts else read_issuance_file(0, [], profile, errors)


ISSUANCE_ORD_STRIDE = 10 ** 12  # a record's load order: file index * stride + row


def empty_issuance() -> pa.Table:
    return pa.table({"ckey": pa.array([], pa.string()), "ord": pa.array([], pa.int64()),
                     "product_id": pa.array([], pa.string()), "pack_units": pa.array([], pa.int64()),
                     "expiry": pa.array([], pa.int64()), "status": pa.array([], pa.string()),
                     "file_index": pa.array([], pa.int32()), "line": pa.array([], pa.int64())})


def read_issuance_file(fi: int, paths: list[str], profile, errors: list[InputError],
                       part: tuple[int, int] | None = None) -> pa.Table:
    """part (start, stop): a Parquet file's rows start..stop-1 only; `ord` then counts from
    start (records are independent here: the merge is sql.ISSUANCE_STEPS', by `ord`)."""
    from tracecode import codec
    from tracecode.rules.issuance import parse_expiry
    t = read_table(paths[fi], ISSUANCE_FIELDS, errors, part) if paths else None
    first = part[0] if part else 0
    if t is not None:
        t = t.append_column("file_index", pa.array([fi] * t.num_rows, pa.int32()))
    if t is None or t.num_rows == 0:
        return empty_issuance()
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
    from tracecode.rules.issuance import TEXT_LIMITS
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
    base = fi * ISSUANCE_ORD_STRIDE + first
    out = pa.table({"ckey": key, "ord": pa.array(range(base, base + n), pa.int64()), "product_id": t["product_id"],
                    "pack_units": units, "expiry": expiry, "status": status,
                    "file_index": t["file_index"], "line": t["line"]})
    return out.filter(keep)


def load_check(fields: dict, profile) -> tuple:
    """One issuance row as `tracecode load` judges it, by the very functions it uses: the
    client's row check, the API's conversion, the server's validate(). The stored tuple, or
    ValueError("field: reason")."""
    from tracecode.rules.issuance import FieldError, input_from_fields, validate_record
    try:
        rec = input_from_fields(fields)
    except FieldError as exc:
        raise ValueError(f"{exc.field}: {exc.reason}") from None
    return validate_record(rec, profile)


def _issuance_reason(row: dict, profile) -> tuple[str, str]:
    """The field and text `tracecode load` reports for a rejected row."""
    try:
        load_check({k: v for k, v in row.items() if k in ISSUANCE_FIELDS}, profile)
    except ValueError as exc:
        field, _, reason = str(exc).partition(": ")
        return field, reason
    return ROW_FIELD, "rejected"


# ------------------------------------------------------------------ sites

def read_sites(path: str | None, errors: list[InputError]) -> pa.Table:
    if not path:
        return pa.table({"site_id": pa.array([], pa.string()), "site_kind": pa.array([], pa.string()),
                         "region": pa.array([], pa.string()), "name": pa.array([], pa.string())})
    t = read_table(path, SITE_FIELDS, errors)
    kind = pc.utf8_upper(t["site_kind"])
    wrong = pc.and_(pc.not_equal(kind, ""), pc.invert(pc.is_in(kind, pa.array(SITE_KINDS))))
    for ln in t.filter(wrong)["line"].to_pylist():
        errors.append(InputError(path, ln, "site_kind", "not PHARMACY or INSTITUTION; kind unknown"))
    kind = pc.if_else(wrong, "", kind)
    # Region and name reach leads.csv and the console: free text by rules/text.py, within the
    # console's columns (region 32, name 200). A bad one is reported and left unknown, as a
    # bad kind is; the reason never repeats the value.
    text = {}
    for name, limit in SITE_TEXT_LIMITS:
        problem = _map_unique(t[name], lambda v, limit=limit, name=name: text_problem(v, limit, name, required=False),
                              pa.string())
        bad = pc.is_valid(problem)
        for ln, why in zip(t.filter(bad)["line"].to_pylist(), pc.filter(problem, bad).to_pylist()):
            errors.append(InputError(path, ln, name, f"{why}; {name} unknown"))
        text[name] = pc.if_else(bad, "", t[name])
    t = pa.table({"line": t["line"], "site_id": t["site_id"], "site_kind": kind, "region": text["region"],
                  "name": text["name"]})
    # A site listed twice: the first row counts (later ones are reported).
    seen: dict[str, int] = {}
    keep = []
    for ln, s in zip(t["line"].to_pylist(), t["site_id"].to_pylist()):
        keep.append(s not in seen)
        if s in seen:
            errors.append(InputError(path, ln, "site_id", f"listed again; the first row (line {seen[s]}) counts"))
        seen.setdefault(s, ln)
    return t.filter(pa.array(keep, pa.bool_())).drop_columns(["line"])
