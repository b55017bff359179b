"""Pure-Python twin of the compiled scan-code parser (`_codec.pyx`).

It is the reference for behaviour: same outputs and same reason strings as the compiled module
for every input (the test suite runs over both and compares them on generated corpora). It is
used when the extension is not built or when TRACECODE_NO_EXTENSIONS=1.

Grammar and the decisions the spec leaves open: docs/codes.md. The shape mirrors the .pyx on
purpose (same steps in the same order), so a difference between the twins is easy to locate.
"""
from .profile import DEFAULT_PROFILE, Profile
from .tables import (
    AI_BATCH,
    AI_EXPIRY,
    AI_GTIN,
    AI_LENGTH_BY_PREFIX,
    AI_LENGTH_DEFAULT,
    AI_SERIAL,
    AI_TABLE,
    AIM_CN20,
    AIM_GS1,
    AIM_IDENTIFIERS,
    AIM_PLAIN2D,
    CHARSET82,
    CN20_LENGTH,
    CN20_PRODUCT,
    CN20_SERIAL,
    DL_GTIN_LENGTHS,
    DL_PRIMARY,
    DL_QUALIFIERS,
    FULLWIDTH_FIRST,
    FULLWIDTH_LAST,
    FULLWIDTH_OFFSET,
    IDEOGRAPHIC_SPACE,
    K_CHECKED,
    K_DATE,
    K_SET82,
    KIND_CN20,
    KIND_GS1,
    KIND_MALFORMED,
    MAX_ELEMENTS,
    PREDEFINED_LENGTH,
    STRIP_CHARS,
    URL_CODE_AFTER,
    URL_CODE_BEFORE,
    URL_SCHEMES,
    check_label,
    show_char,
)
from . import tables as T

_DIGITS = frozenset("0123456789")
_SET82 = frozenset(CHARSET82)
_HEX = frozenset("0123456789abcdefABCDEF")


class _Reject(Exception):
    """A scan is malformed; carries the reason. Never escapes `parse`."""

    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason


def _reject(template, **fields):
    raise _Reject(template.format(**fields))


# --- public API ---------------------------------------------------------------------------------


def parse(raw, profile=None):
    """Parse one scan: (kind, key, product, serial, batch, expiry, reason). Never raises for str."""
    if not isinstance(raw, str):
        raise TypeError(f"raw must be str, not {type(raw).__name__}")
    if profile is None:
        profile = DEFAULT_PROFILE
    elif not isinstance(profile, Profile):
        raise TypeError(f"profile must be a Profile or None, not {type(profile).__name__}")
    try:
        return _parse(raw, profile)
    except _Reject as rejected:
        return (KIND_MALFORMED, "", "", "", "", 0, rejected.reason)


def parse_many(raws, profile=None):
    """Parse a whole settlement or bulk chunk: a list of `parse` results, in order."""
    if profile is not None and not isinstance(profile, Profile):
        raise TypeError(f"profile must be a Profile or None, not {type(profile).__name__}")
    return [parse(raw, profile) for raw in raws]


def keys_many(raws, profile=None):
    """The canonical key of each scan, in order ('' where it is malformed): parse_many's KEY column."""
    return [p[1] for p in parse_many(raws, profile)]


def gtin_check_digit(digits):
    """GS1 mod-10 check digit for the digits before it (e.g. the first 13 of a GTIN-14)."""
    if not isinstance(digits, str):
        raise TypeError(f"digits must be str, not {type(digits).__name__}")
    if not digits or not all(c in _DIGITS for c in digits):
        raise ValueError(f"digits must be ASCII digits, got {digits!r}")
    return _check_digit(digits)


def _check_digit(body):
    # Weights 3,1,3,1... from the rightmost digit of the body (the one next to the check digit).
    total = 0
    weight = 3
    for c in reversed(body):
        total += (ord(c) - 48) * weight
        weight = 4 - weight
    return (10 - total % 10) % 10


# --- top level ----------------------------------------------------------------------------------


def _parse(raw, profile):
    if len(raw) > profile.max_length:
        _reject(T.R_TOO_LONG, n=len(raw), max=profile.max_length)
    text = _normalise(raw)
    if not text:
        _reject(T.R_EMPTY)
    mode = None
    off = 0
    if text[0] == "]":
        mode = _symbology(text)
        off = 3
    if mode == AIM_CN20:
        return _cn20(text, off, profile)
    if mode == AIM_PLAIN2D:
        if _is_url(text, off):
            return _url(text, off, profile)
        return _cn20(text, off, profile)
    if mode == AIM_GS1:
        if text[off] == "(":
            return _parenthesised(text, off, profile)
        return _element_string(text, off, profile)
    return _auto(text, profile)


def _normalise(raw):
    """Full-width to ASCII, strip what scanners and IMEs wrap around a scan, insist on ASCII."""
    if not raw.isascii():
        raw = "".join(map(_fold_char, raw))
    text = raw.strip(STRIP_CHARS)
    if not text.isascii():
        for i, ch in enumerate(text):
            if ord(ch) > 0x7F:
                _reject(T.R_NOT_ASCII, ch=show_char(ord(ch)), pos=i + 1)
    return text


def _fold_char(ch):
    c = ord(ch)
    if FULLWIDTH_FIRST <= c <= FULLWIDTH_LAST:
        return chr(c - FULLWIDTH_OFFSET)
    if c == IDEOGRAPHIC_SPACE:
        return " "
    return ch


def _symbology(text):
    if len(text) < 3:
        _reject(T.R_AIM_INCOMPLETE)
    aim = text[:3]
    mode = AIM_IDENTIFIERS.get(aim)
    if mode is None:
        if "!" <= aim[1] <= "~" and "!" <= aim[2] <= "~":
            _reject(T.R_AIM_UNSUPPORTED, aim=aim)
        _reject(T.R_AIM_UNSUPPORTED_ANON)
    if len(text) == 3:
        _reject(T.R_AIM_EMPTY, aim=aim)
    return mode


def _auto(text, profile):
    """No symbology identifier: decide the form from the content (docs/codes.md, "Which form")."""
    if _is_url(text, 0):
        return _url(text, 0, profile)
    if text[0] == "(":
        return _parenthesised(text, 0, profile)
    if any(sep in text for sep in profile.separators):
        return _element_string(text, 0, profile)
    if text.startswith(AI_GTIN):
        # An all-digit 20-character string starting 01 is a Chinese code only if 0 is admitted.
        if not (len(text) == CN20_LENGTH and text.isdigit() and _admits(profile, "0")):
            return _element_string(text, 0, profile)
    return _cn20(text, 0, profile)


# --- 20-digit Chinese code ----------------------------------------------------------------------


def _admits(profile, digit):
    return not profile.cn_prefixes or digit in profile.cn_prefixes


def _cn20(text, off, profile):
    code = text[off:]
    for i, ch in enumerate(code):
        if ch not in _DIGITS:
            _reject(T.R_CN_CHAR, ch=show_char(ord(ch)), pos=i + 1)
    if len(code) != CN20_LENGTH:
        _reject(T.R_CN_LEN, n=len(code))
    return _cn20_result(code, profile)


def _cn20_result(code, profile):
    if not _admits(profile, code[0]):
        _reject(T.R_CN_PREFIX, d=code[0], admitted=", ".join(profile.cn_prefixes))
    return (KIND_CN20, code, code[CN20_PRODUCT], code[CN20_SERIAL], "", 0, "")


# --- URLs: GS1 Digital Link or a verification URL around a 20-digit code -----------------------


def _is_url(text, off):
    head = text[off : off + 8].lower()
    return head.startswith(URL_SCHEMES)


def _url(text, off, profile):
    n = len(text)
    i = off + (7 if text[off : off + 7].lower() == "http://" else 8)
    while i < n and text[i] not in "/?#":  # authority: any host
        i += 1
    path_start = i
    while i < n and text[i] not in "?#":
        i += 1
    path_end = i
    query = None
    if i < n and text[i] == "?":
        j = i + 1
        while j < n and text[j] != "#":
            j += 1
        query = (i + 1, j)
    segs = _segments(text, path_start, path_end)
    first = _digital_link_start(text, segs)
    if first >= 0:
        return _digital_link(text, segs, first, query, profile)
    runs = _code_runs(text, path_start)
    if len(runs) == 1:
        return _cn20_result(runs[0], profile)
    if len(runs) > 1:
        _reject(T.R_URL_MANY, n=len(runs))
    if any(text[a:b] == DL_PRIMARY for a, b in segs):
        _reject(T.R_DL_PAIRS)
    _reject(T.R_URL_NONE)


def _segments(text, start, end):
    """(start, end) of each path segment; one trailing empty segment (a final '/') is dropped."""
    if start >= end:
        return []
    segs = []
    a = start + 1  # the path starts with '/'
    for b in range(a, end + 1):
        if b == end or text[b] == "/":
            segs.append((a, b))
            a = b + 1
    if segs[-1][0] == segs[-1][1]:
        segs.pop()
    return segs


def _digital_link_start(text, segs):
    """Index of the first '01' segment followed only by 22/10/21 key-value pairs, or -1."""
    count = len(segs)
    for i, (a, b) in enumerate(segs):
        if text[a:b] != DL_PRIMARY or (count - i) % 2:
            continue
        if all(text[segs[k][0] : segs[k][1]] in DL_QUALIFIERS for k in range(i + 2, count, 2)):
            return i
    return -1


def _code_runs(text, start):
    """20-digit runs that are a whole path segment or query value, after `start`."""
    runs = []
    n = len(text)
    i = start
    while i < n:
        if text[i] not in _DIGITS:
            i += 1
            continue
        j = i
        while j < n and text[j] in _DIGITS:
            j += 1
        if (
            j - i == CN20_LENGTH
            and text[i - 1] in URL_CODE_BEFORE
            and (j == n or text[j] in URL_CODE_AFTER)
        ):
            runs.append(text[i:j])
        i = j
    return runs


def _digital_link(text, segs, first, query, profile):
    found = {}
    ref = _RefYear(profile)
    for k in range(first, len(segs), 2):
        (a, b), (c, d) = segs[k], segs[k + 1]
        _dl_element(found, text[a:b], _percent_decode(text, c, d), ref)
    if query is not None:
        q, end = query
        while q <= end:
            amp = text.find("&", q, end)
            stop = end if amp < 0 else amp
            eq = text.find("=", q, stop)
            key_end = stop if eq < 0 else eq
            key = text[q:key_end]
            if key and all(c in _DIGITS for c in key):
                if key not in AI_TABLE:
                    _reject(T.R_DL_QUERY_AI, ai=key, pos=q + 1)
                value = _percent_decode(text, key_end + 1, stop) if eq >= 0 else ""
                _dl_element(found, key, value, ref)
            q = stop + 1
    return _gs1_result(found, ref)


def _dl_element(found, ai, value, ref):
    if ai == AI_GTIN:
        value = _dl_gtin(value)
    _validate(ai, value, ref)
    _merge(found, ai, value)


def _dl_gtin(value):
    """GTIN-8/12/13/14 from a Digital Link, left-padded to the GTIN-14 of AI 01."""
    for i, ch in enumerate(value):
        if ch not in _DIGITS:
            _reject(T.R_AI_DIGIT, ai=AI_GTIN, ch=show_char(ord(ch)), pos=i + 1)
    if len(value) not in DL_GTIN_LENGTHS:
        _reject(T.R_DL_GTIN_LEN, n=len(value))
    return value.rjust(14, "0")


def _percent_decode(text, start, end):
    if text.find("%", start, end) < 0:
        return text[start:end]
    out = []
    i = start
    while i < end:
        ch = text[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        if i + 3 > end or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
            _reject(T.R_DL_PERCENT, pos=i + 1)
        out.append(chr(int(text[i + 1 : i + 3], 16)))
        i += 3
    return "".join(out)


# --- GS1 element strings ------------------------------------------------------------------------


def _sep_at(text, p, seps):
    """Length of the separator (GS or a profile substitute) starting at p, else 0."""
    for sep in seps:
        if text.startswith(sep, p):
            return len(sep)
    return 0


def _skip_seps(text, p, seps):
    while True:
        m = _sep_at(text, p, seps)
        if not m:
            return p
        p += m


def _next_sep(text, p, seps):
    """Start of the first separator at or after p, else len(text)."""
    best = len(text)
    for sep in seps:
        i = text.find(sep, p)
        if 0 <= i < best:
            best = i
    return best


def _element_string(text, off, profile):
    seps = profile.separators
    n = len(text)
    p = _skip_seps(text, off, seps)  # a transmitted leading FNC1 is tolerated
    found = {}
    ref = _RefYear(profile)
    while p < n:
        ai = _read_ai(text, p)
        vs = p + len(ai)
        if ai[:2] in PREDEFINED_LENGTH:
            # Predefined length: exactly that many characters, no separator needed after them.
            want = AI_TABLE[ai][1]
            e = vs
            while e < n and e - vs < want and not _sep_at(text, e, seps):
                e += 1
            if e - vs < want:
                _reject(T.R_AI_FIXED_LEN, ai=ai, n=e - vs, exp=want)
        else:
            e = _next_sep(text, vs, seps)
        value = text[vs:e]
        p = _skip_seps(text, e, seps)  # repeated separators carry nothing: tolerated
        _validate(ai, value, ref)
        _merge(found, ai, value)
    return _gs1_result(found, ref)


def _read_ai(text, p):
    """The AI starting at p (2, 3 or 4 digits; GS1 AIs are prefix-free)."""
    if text[p] not in _DIGITS:
        _reject(T.R_GS1_EXPECT_AI, pos=p + 1, ch=show_char(ord(text[p])))
    digits = 0
    while digits < 4 and p + digits < len(text) and text[p + digits] in _DIGITS:
        digits += 1
        if digits >= 2 and text[p : p + digits] in AI_TABLE:
            return text[p : p + digits]
    if digits < 2:
        _reject(T.R_GS1_INCOMPLETE_AI, pos=p + 1)
    width = min(AI_LENGTH_BY_PREFIX.get(text[p : p + 2], AI_LENGTH_DEFAULT), digits)
    _reject(T.R_GS1_UNKNOWN_AI, ai=text[p : p + width], pos=p + 1)


def _group_end(text, p):
    """Index of ')' if an '(' + 2-4 digits + ')' AI group starts at p, else -1."""
    n = len(text)
    if text[p] != "(":
        return -1
    j = p + 1
    while j < n and j - p - 1 < 4 and text[j] in _DIGITS:
        j += 1
    if j - p - 1 >= 2 and j < n and text[j] == ")":
        return j
    return -1


def _parenthesised(text, off, profile):
    """Human-readable form: (01)...(21)...; a value runs to the next well-formed AI group."""
    n = len(text)
    p = off
    found = {}
    ref = _RefYear(profile)
    while p < n:
        if text[p] != "(":
            _reject(T.R_GS1_EXPECT_PAREN, pos=p + 1, ch=show_char(ord(text[p])))
        close = _group_end(text, p)
        if close < 0:
            _reject(T.R_GS1_BAD_GROUP, pos=p + 1)
        ai = text[p + 1 : close]
        if ai not in AI_TABLE:
            _reject(T.R_GS1_UNKNOWN_AI, ai=ai, pos=p + 2)
        e = close + 1
        while e < n and _group_end(text, e) < 0:
            e += 1
        value = text[close + 1 : e]
        p = e
        _validate(ai, value, ref)
        _merge(found, ai, value)
    return _gs1_result(found, ref)


# --- AI values ----------------------------------------------------------------------------------


class _RefYear:
    """The sliding-window reference year, looked up only if a date is actually present."""

    __slots__ = ("profile", "year")

    def __init__(self, profile):
        self.profile = profile
        self.year = None

    def get(self):
        if self.year is None:
            self.year = self.profile.ref_year()
        return self.year


def _validate(ai, value, ref):
    lo, hi, kind = AI_TABLE[ai]
    n = len(value)
    if lo == hi:
        if n != lo:
            _reject(T.R_AI_FIXED_LEN, ai=ai, n=n, exp=lo)
    elif n == 0:
        _reject(T.R_AI_EMPTY, ai=ai)
    elif n > hi:
        _reject(T.R_AI_MAX_LEN, ai=ai, n=n, max=hi)
    elif n < lo:
        _reject(T.R_AI_MIN_LEN, ai=ai, n=n, min=lo)
    if kind == K_SET82:
        for i, ch in enumerate(value):
            if ch not in _SET82:
                _reject(T.R_AI_SET82, ai=ai, ch=show_char(ord(ch)), pos=i + 1)
        return
    for i, ch in enumerate(value):
        if ch not in _DIGITS:
            _reject(T.R_AI_DIGIT, ai=ai, ch=show_char(ord(ch)), pos=i + 1)
    if kind == K_CHECKED:
        want = _check_digit(value[:-1])
        if want != ord(value[-1]) - 48:
            _reject(T.R_AI_CHECK, label=check_label(ai), exp=want, got=value[-1])
    elif kind == K_DATE:
        _check_date(ai, value, ref.get())


def _century_year(yy, ref_year):
    """GS1 Gen Specs 7.12: YY is the year within -49..+50 of the reference year."""
    diff = yy - ref_year % 100
    base = ref_year - ref_year % 100
    if diff > 50:
        base -= 100
    elif diff < -49:
        base += 100
    return base + yy


def _days_in_month(year, month):
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _check_date(ai, value, ref_year):
    month = int(value[2:4])
    if not 1 <= month <= 12:
        _reject(T.R_AI_MONTH, ai=ai, mm=value[2:4], value=value)
    year = _century_year(int(value[:2]), ref_year)
    if int(value[4:6]) > _days_in_month(year, month):
        _reject(T.R_AI_DAY, ai=ai, dd=value[4:6], yyyy=year, mm=value[2:4], value=value)


def _expiry(value, ref_year):
    """YYYYMMDD of a validated YYMMDD; day 00 means the last day of the month."""
    year = _century_year(int(value[:2]), ref_year)
    month = int(value[2:4])
    day = int(value[4:6]) or _days_in_month(year, month)
    return year * 10000 + month * 100 + day


def _merge(found, ai, value):
    prev = found.get(ai)
    if prev is None:
        if len(found) >= MAX_ELEMENTS:
            _reject(T.R_GS1_TOO_MANY, max=MAX_ELEMENTS)
        found[ai] = value
    elif prev != value:
        _reject(T.R_GS1_DUPLICATE, ai=ai)


def _gs1_result(found, ref):
    gtin = found.get(AI_GTIN)
    if gtin is None:
        _reject(T.R_GS1_NO_GTIN)
    serial = found.get(AI_SERIAL)
    if serial is None:
        _reject(T.R_GS1_NO_SERIAL)
    expiry = found.get(AI_EXPIRY)
    expiry = _expiry(expiry, ref.get()) if expiry is not None else 0
    key = AI_GTIN + gtin + AI_SERIAL + serial
    return (KIND_GS1, key, gtin, serial, found.get(AI_BATCH, ""), expiry, "")
