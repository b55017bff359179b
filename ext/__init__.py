"""Scan-code codec: every form a pharmacy scanner sends -> one canonical key per pack.

    from tracecode.codec import parse, parse_many, Profile, KEY, REASON
    parsed = parse("]d2010690123456789221SN1")
    parsed[KEY], parsed[REASON]          # '010690123456789221SN1', ''

A result is a plain 7-tuple (`Parsed`), built in C on the hot path; read it by the named indexes
KIND, KEY, PRODUCT, SERIAL, BATCH, EXPIRY, REASON (or unpack it whole), never by bare numbers.
KIND is KIND_CN20, KIND_GS1 or KIND_MALFORMED; KEY the canonical key ('' when malformed);
PRODUCT the GTIN-14 or the 7-digit product of a 20-digit code; EXPIRY YYYYMMDD or 0; REASON
why it is malformed ('' otherwise). The compiled module's signatures are in `_codec.pyi`.

Two implementations with identical behaviour: the compiled `_codec` (default) and the pure-Python
`fallback` (TRACECODE_NO_EXTENSIONS=1, or when the extension is not built: then a WARNING is
logged, because the service would run an order of magnitude slower). `IMPLEMENTATION` says which
one is active: "compiled" or "python".
"""
import logging
import os
from typing import Tuple

from .profile import DEFAULT_PROFILE, Profile
from .tables import KIND_CN20, KIND_GS1, KIND_MALFORMED

__all__ = [
    "BATCH",
    "EXPIRY",
    "IMPLEMENTATION",
    "KEY",
    "KIND",
    "PRODUCT",
    "Parsed",
    "REASON",
    "SERIAL",
    "KIND_CN20",
    "KIND_GS1",
    "KIND_MALFORMED",
    "DEFAULT_PROFILE",
    "Profile",
    "gtin_check_digit",
    "parse",
    "parse_many",
    "keys_many",
]

# The parse result: (kind, key, product, serial, batch, expiry, reason), and its named indexes.
Parsed = Tuple[int, str, str, str, str, int, str]
KIND, KEY, PRODUCT, SERIAL, BATCH, EXPIRY, REASON = range(7)

_log = logging.getLogger("tracecode.codec")


def _select():
    if os.environ.get("TRACECODE_NO_EXTENSIONS", "").strip() not in ("", "0"):
        from . import fallback

        return fallback, "python"
    try:
        from . import _codec
    except ImportError as exc:
        from . import fallback

        _log.warning(
            "tracecode.codec: compiled extension _codec not available (%s); using the pure-Python "
            "fallback, which is more than 20x slower. Build it with "
            "'python setup.py build_ext --inplace' or reinstall the package.",
            exc,
        )
        return fallback, "python"
    return _codec, "compiled"


_impl, IMPLEMENTATION = _select()
parse = _impl.parse
parse_many = _impl.parse_many
keys_many = _impl.keys_many
gtin_check_digit = _impl.gtin_check_digit
del _select
