"""The packed forms of the store's national layout (keys.LAYOUT 3): how a canonical code, a time
and a pseudonym are written in Redis toward their floor (docs/scaling.md), and back.

Every packed form is printable ASCII: six bits a character from '?' (0x3F) to '~' (0x7E), one
contiguous run, so packing and unpacking are an addition (the Lua inside Redis builds no
alphabet table on every call), plus a one-character kind marker ('~', '!'). A packed value never
holds the separators of the packed entries (US, RS, below 0x20) nor a space, decodes as UTF-8
through any client, and reads in redis-cli. Six bits a character is a byte and a half more per
code than raw binary, and buys all of that. Packed values are hash field names and values, never
key names (a key keeps its text code: the history list), so the braces and the colon of the run
do not matter; the settlement ledger's json escapes its backslash.

    code_field(code)   a canonical code (codes.md) as the field name of its entry and of its batch
                       index: a 20-digit code is 68 bits in 12 characters (each half of ten digits
                       is below 2^34, six characters); a GS1 code ('01' GTIN-14 '21' serial) is
                       '~', the GTIN in 8 characters (47 bits) and the serial as it is; anything
                       else is '!' and the code. A 20-digit code's first character is one of the
                       alphabet's first 16 (34 bits in 36: '?' to 'N'), so the three kinds never
                       meet.
    ms_field(ms)       a time in ms since the epoch (41 bits until 2039, 42 until 2109) in 7
                       characters instead of 13 digits
    id_field(s)        a site or settlement id (rules/rows.py: A-Z a-z 0-9 . _ -) whose tail is a run
                       of 10 to 19 digits, the run's first digit not 0: the rest, a marker
                       ('!' to '*': the run's length) and the run as two numbers (all but its last
                       nine digits, in 1-6 characters; its last nine, in 5). A settlement id
                       "JS" + 18 digits is 13 characters instead of 20, a site "P" + 11 digits 9
                       instead of 12; an id without such a tail is left as it is. The marker is
                       outside the ids' alphabet, so a packed id is told from a plain one.
    hex128_field(p)    an id, a dot and 128 bits in 32 hex digits (a pseudonym 'k1.…',
                       rules/pseudonym.py; a settlement body's digest '2.…') as the id, the dot
                       and 22 characters (the bits in order, four zero bits after the last);
                       anything else is left as it is. The server packs them (a settlement's
                       buyer and digest, once per call); the Lua unpacks a buyer where it needs
                       the pseudonym itself and packs one only on a cluster's commit.

Each has its inverse (`code_of`, `ms_of`, `hex128_of`). The Lua that runs them inside Redis
(server/store/lua/_state.lua: cfield, msf, ms_of, h128f, h128_of) is the same arithmetic;
tests/test_packing.py holds the two to each other over random and edge values through a real
redis-server.

Imports: the standard library only.
"""
from __future__ import annotations

import base64
import re

__all__ = ["ALPHABET", "code_field", "code_of", "ms_field", "ms_of", "id_field", "id_of", "hex128_field", "hex128_of"]

ALPHABET = "".join(chr(0x3F + i) for i in range(64))
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
GS1, OTHER = "~", "!"
_GS1 = re.compile(r"01([0-9]{14})21(.+)\Z", re.S)  # ASCII digits only, as Lua's %d
_PSEUDONYM = re.compile(r"([A-Za-z0-9_-]{1,16})\.([0-9a-f]{32})\Z")
_PACKED_PSEUDONYM = re.compile(r"([A-Za-z0-9_-]{1,16})\.([?-~]{22})\Z")
MS_CHARS = 7  # 42 bits: until the year 2109


def _chars(x: int, n: int) -> str:
    """x (< 64**n) in n characters, most significant first."""
    out = []
    for _ in range(n):
        out.append(ALPHABET[x & 63])
        x >>= 6
    if x:
        raise ValueError("value does not fit")
    return "".join(reversed(out))


def _value(text: str) -> int:
    x = 0
    for c in text:
        x = (x << 6) | _VALUE[c]
    return x


def code_field(code: str) -> str:
    """The field name of a canonical code's entry (and of its batch index entry). The server
    packs the codes of a settlement (verify.lua takes them beside the codes), so this is on the
    counter's path: base64 in C over the bits (two 36-bit halves are 9 bytes, 12 characters; a
    GTIN is 6 bytes, 8 characters) rather than a loop per character."""
    if len(code) == 20 and code.isascii() and code.isdigit():
        bits = (int(code[:10]) << 36) | int(code[10:])
        return base64.b64encode(bits.to_bytes(9, "big")).translate(_TO_RUN).decode()
    m = _GS1.match(code)
    if m:
        return GS1 + base64.b64encode(int(m.group(1)).to_bytes(6, "big")).translate(_TO_RUN).decode() + m.group(2)
    return OTHER + code


def code_of(field: str) -> str:
    """The canonical code of an entry's field name (the inverse of code_field)."""
    if field.startswith(GS1):
        return "01" + str(int.from_bytes(_raw(field[1:9]), "big")).zfill(14) + "21" + field[9:]
    if field.startswith(OTHER):
        return field[1:]
    if len(field) != 12 or any(c not in _VALUE for c in field):
        raise ValueError(f"not a packed code field: {field!r}")
    bits = int.from_bytes(_raw(field), "big")
    return str(bits >> 36).zfill(10) + str(bits & (2**36 - 1)).zfill(10)


def _raw(text: str) -> bytes:
    return base64.b64decode(text.encode().translate(_FROM_RUN))


# Characters for the part of an id's digit run before its last nine digits, by that part's length
# (1..10 digits): enough six-bit characters for 10**length - 1.
_HI_CHARS = (1, 2, 2, 3, 3, 4, 4, 5, 5, 6)
_ID_MARK0 = 0x21  # '!' marks a run of 10 digits, '*' one of 19


def id_field(s: str) -> str:
    """A site or settlement id, packed when its tail is a long enough run of digits (above)."""
    n = len(s)
    d = 0
    while d < n and d < 19 and "0" <= s[n - 1 - d] <= "9":
        d += 1
    for run in range(d, 9, -1):  # the longest tail of 10..19 digits that does not start with 0
        if s[n - run] != "0":
            hi, lo = int(s[n - run:n - 9]), int(s[n - 9:])
            return s[:n - run] + chr(_ID_MARK0 + run - 10) + _chars(hi, _HI_CHARS[run - 10]) + _chars(lo, 5)
    return s


def id_of(text: str) -> str:
    """The inverse of id_field."""
    for p, c in enumerate(text):
        if _ID_MARK0 <= ord(c) < _ID_MARK0 + 10:
            run = ord(c) - _ID_MARK0 + 10
            h = _HI_CHARS[run - 10]
            packed = text[p + 1:]
            if len(packed) != h + 5 or any(ch not in _VALUE for ch in packed):
                return text  # not a packed id (an id outside rules/rows.py's alphabet)
            return text[:p] + str(_value(packed[:h])) + str(_value(packed[h:])).zfill(9)
    return text


def ms_field(ms: int) -> str:
    """A time in ms since the epoch, packed."""
    if ms < 0:
        raise ValueError(f"a time before the epoch: {ms}")
    return _chars(ms, MS_CHARS)


def ms_of(text: str) -> int:
    """The inverse of ms_field ('' is 0: no time)."""
    return _value(text) if text else 0


# base64's alphabet onto the run '?'..'~', and back: a packed 128-bit value is its standard
# base64 (the bits in order, the last character's low four bits zero) less the padding, moved
# onto the run; base64 in C is what makes the packing of every settlement's buyer cheap.
_TO_RUN = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", bytes(range(0x3F, 0x7F)))
_FROM_RUN = bytes.maketrans(bytes(range(0x3F, 0x7F)), b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def hex128_field(p: str) -> str:
    """A pseudonym or a digest, packed (its 128 bits in 22 characters); '' and any other form as
    they are."""
    m = _PSEUDONYM.match(p)
    if not m:
        return p
    return m.group(1) + "." + base64.b64encode(bytes.fromhex(m.group(2)))[:22].translate(_TO_RUN).decode()


def hex128_of(text: str) -> str:
    """The inverse of hex128_field."""
    m = _PACKED_PSEUDONYM.match(text)
    if not m:
        return text
    return m.group(1) + "." + base64.b64decode(m.group(2).encode().translate(_FROM_RUN) + b"==").hex()
