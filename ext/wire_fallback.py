"""The settlement path's wire work in pure Python: the twin of the compiled `_wire.pyx`, which
must give identical results for every input (tests/test_wire.py runs one suite over both and
compares them on generated inputs). What each function does is documented in `wire.py`.

A leaf like the rest of tracecode.codec: it knows the shapes it is given (a results row has 12
fields; a line has raw_code / product_id / units attributes), never the server's modules.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

from .wire_types import ACTIVE_STATUS, INT_FIELDS, OK_VERDICT, OWN, ROW_WIDTH, STATUS, VERDICT, Results

RECORD_SEP = "\x1e"  # before each line of the packed form
FIELD_SEP = "\x1f"  # between the fields of a line
_DIGITS = frozenset("0123456789")


def _int(text: str) -> int:
    """A decimal integer as the packed form writes it: '' for 0, else an optional '-' and ASCII
    digits only (int() would also take spaces, '+', '_' and other scripts' digits)."""
    if not text:
        return 0
    body = text[1:] if text[:1] == "-" else text
    if not body or not _DIGITS.issuperset(body):
        raise ValueError(f"packed results: {text!r} is not a decimal integer")
    return int(text)


def decode_results(text: str, row_type: Any, own: Sequence[Any] | None = None) -> Results:
    """A verify.lua answer or stored results text -> Results(recorded, rows of row_type). The
    packed row's defaults (rules/schema.py) come back: ints written '' are 0, a verdict '' is OK
    of an ACTIVE pack, trailing fields left off are ''. With `own` (site, settlement id,
    settled_at ms: a stored record's own), a packed row whose first dispense is written '='
    (the settlement's own first dispense) gets those three values."""
    parts = text.split(RECORD_SEP)
    head = parts[0]
    if head != "0" and head != "1":
        raise ValueError(f"packed results: recorded flag {head[:20]!r}, want '0' or '1'")
    rows = []
    for part in parts[1:]:
        f: list[Any] = part.split(FIELD_SEP)
        if len(f) > ROW_WIDTH:
            raise ValueError(f"packed results: a line of {len(f)} fields, want at most {ROW_WIDTH}")
        if len(f) < ROW_WIDTH:
            f.extend([""] * (ROW_WIDTH - len(f)))
        if not f[VERDICT]:
            if f[STATUS]:
                raise ValueError(f"packed results: status {f[STATUS][:20]!r} on a line written as OK")
            f[VERDICT], f[STATUS] = OK_VERDICT, ACTIVE_STATUS
        if f[OWN] == "=":
            if own is None:
                raise ValueError("packed results: a record's own first dispense ('=') read without its owner")
            f[OWN:OWN + 3] = str(own[0]), str(own[1]), str(own[2])
        for i in INT_FIELDS:
            f[i] = _int(f[i])
        rows.append(row_type(*f))
    return Results(head == "1", rows)


def encode_results(recorded: bool, rows: Sequence[Sequence[Any]]) -> str:
    """The packed form of (recorded, rows), with its defaults written as nothing:
    decode_results(encode_results(r, rows)) == (r, rows). A verdict '' is refused (it would
    read back as OK)."""
    out = ["1" if recorded else "0"]
    for row in rows:
        if len(row) != ROW_WIDTH:
            raise ValueError(f"a row of {len(row)} fields, want {ROW_WIDTH}")
        fields = []
        for i, v in enumerate(row):
            if i in INT_FIELDS:
                if type(v) is not int:
                    raise TypeError(f"field {i}: {type(v).__name__}, want int")
                fields.append(str(v) if v else "")
            else:
                if type(v) is not str:
                    raise TypeError(f"field {i}: {type(v).__name__}, want str")
                if RECORD_SEP in v or FIELD_SEP in v:
                    raise ValueError(f"field {i}: {v!r} holds a separator")
                fields.append(v)
        if not fields[VERDICT]:
            raise ValueError(f"field {VERDICT}: an empty verdict")
        if fields[VERDICT] == OK_VERDICT and fields[STATUS] == ACTIVE_STATUS:
            fields[VERDICT] = fields[STATUS] = ""
        out.append(RECORD_SEP + FIELD_SEP.join(fields).rstrip(FIELD_SEP))
    return "".join(out)


def verify_argv(fixed: Sequence[Any], lines: Sequence[Sequence[Any]], line_indexes: Sequence[int],
                codes: Sequence[str], tail: Sequence[Any]) -> list:
    """One verify.lua call's ARGV: the fixed values, then per line its fields and its index,
    then the codes, then the tail (the sanction gate's arguments)."""
    args = list(fixed)
    for line, i in zip(lines, line_indexes):
        args.extend(line)
        args.append(i)
    args.extend(codes)
    args.extend(tail)
    return args


def body_digest(site_id: str, settlement_id: str, at_ms: int, all_or_nothing: bool, lines: Sequence[Any]) -> str:
    """The settlement body's idempotency digest ("2." + BLAKE2b-128 hex, personalised
    "tracecode-body2") over every field written as its UTF-8 length (4 bytes, big-endian) and
    bytes: site, settlement id, at_ms, 'A'|'R', the number of lines, then per line raw_code,
    product_id, units."""
    fields = [site_id, settlement_id, str(at_ms), "A" if all_or_nothing else "R", str(len(lines))]
    for ln in lines:
        fields += (ln.raw_code, ln.product_id, str(ln.units))
    buf = bytearray()
    for f in fields:
        b = f.encode("utf-8", "surrogatepass")
        buf += len(b).to_bytes(4, "big")
        buf += b
    return "2." + hashlib.blake2b(bytes(buf), digest_size=16, person=b"tracecode-body2").hexdigest()
