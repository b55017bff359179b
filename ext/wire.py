"""The settlement path's wire work, compiled (`_wire`) or in pure Python (`wire_fallback`),
chosen as the scan codec is (TRACECODE_NO_EXTENSIONS=1 forces the pure-Python twin; a missing
extension falls back to it with a WARNING). `IMPLEMENTATION` says which: "compiled" or "python".

    decode_results(text, row_type) -> Results(recorded, rows)
        A verify.lua answer (or a stored settlement's results), packed: "0" | "1" (recorded),
        then per line "\\x1e" and the 13 fields of a row joined by "\\x1f", int fields in
        decimal, the defaults written as nothing (an int 0; the verdict OK and status ACTIVE of
        the usual line, both ''; trailing empty fields left off); zero lines is just "0" / "1".
        Each row is row_type(*its 13 fields) (the store's ScriptRow). decode_results(text,
        row_type, own=(site, settlement_id, settled_at_ms)) reads a stored record, whose own
        first dispense is written '=', '', '' in the packed form.
    encode_results(recorded, rows) -> the packed form (decode_results inverts it exactly).
    verify_argv(fixed, lines, line_indexes, codes, tail) -> list
        One verify.lua call's ARGV: the fixed values (layout.VERIFY_ARGV order), each PlanLine's
        fields followed by its line index, the distinct codes, then the sanction gate's tail.
    body_digest(site_id, settlement_id, at_ms, all_or_nothing, lines) -> "2." + 32 hex digits
        The idempotency digest of a settlement body (verifier.Verifier.digest); lines are
        objects with raw_code, product_id and units.

The separators are safe in the packed form: ids are [A-Za-z0-9._-] and free text is refused
when it holds a control character (tracecode.rules.text); encode_results refuses them too.
"""
from __future__ import annotations

import logging
import os

from .wire_types import INT_FIELDS, OWN, ROW_WIDTH, Results

__all__ = ["IMPLEMENTATION", "INT_FIELDS", "OWN", "ROW_WIDTH", "Results", "body_digest", "decode_results",
           "encode_results", "verify_argv"]

_log = logging.getLogger("tracecode.codec")


def _select():
    if os.environ.get("TRACECODE_NO_EXTENSIONS", "").strip() not in ("", "0"):
        from . import wire_fallback

        return wire_fallback, "python"
    try:
        from . import _wire
    except ImportError as exc:
        from . import wire_fallback

        _log.warning("tracecode.codec.wire: compiled extension _wire not available (%s); using the "
                     "pure-Python twin. Build it with 'python setup.py build_ext --inplace'.", exc)
        return wire_fallback, "python"
    return _wire, "compiled"


_impl, IMPLEMENTATION = _select()
decode_results = _impl.decode_results
encode_results = _impl.encode_results
verify_argv = _impl.verify_argv
body_digest = _impl.body_digest
del _select
