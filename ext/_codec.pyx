# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=True
"""Compiled scan-code parser: the per-code hot path of tracecode.

Behaviour is defined by the pure-Python twin `fallback.py` (same steps, same order, same reason
templates from `tables.py`); this module does the same walk over the str's own 1-byte buffer with
C lookup tables built from `tables.py` at import. No Python object is created while parsing: the
walk records offsets (and, on rejection, an error code with its fields) in a C struct, and only the
output strings, the tuple and -- for a rejection -- the reason are built at the end.
"""
from libc.string cimport memcmp, memcpy, memset, strlen
from libc.stdio cimport snprintf
from libc.stdlib cimport malloc, free
from libc.time cimport time_t, tm, time
from cpython.unicode cimport PyUnicode_Check, PyUnicode_CheckExact
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF

from .profile import DEFAULT_PROFILE, Profile
from . import tables as T

cdef extern from "Python.h":
    ctypedef unsigned char Py_UCS1
    bint PyUnicode_IS_ASCII(object o)
    int PyUnicode_READY(object o) except -1
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    Py_UCS1* PyUnicode_1BYTE_DATA(object o)
    Py_UCS4 PyUnicode_READ(int kind, void* data, Py_ssize_t i)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void PyObject_GC_UnTrack(object o)

cdef extern from "<time.h>" nogil:
    tm* localtime_r(const time_t* timer, tm* result)

ctypedef const unsigned char* cstr

# --- constants from the tables --------------------------------------------------------------------

KIND_MALFORMED = T.KIND_MALFORMED
KIND_CN20 = T.KIND_CN20
KIND_GS1 = T.KIND_GS1

cdef enum:
    MAX_AI = 2048
    MAX_ELEMENTS = 64      # checked against tables.MAX_ELEMENTS at import
    STACK_BYTES = 2048     # scans up to this size are normalised / decoded without malloc
    MAX_AIM = 16
    MAX_STRIP_WIDE = 8

cdef enum:
    KIND_MALFORMED_C = 0
    KIND_CN20_C = 1
    KIND_GS1_C = 2

cdef enum:
    K_DIGITS = 0
    K_SET82 = 1
    K_DATE = 2
    K_CHECKED = 3

cdef enum:
    MODE_AUTO = 0
    MODE_CN20 = 1
    MODE_PLAIN2D = 2
    MODE_GS1 = 3

# Error codes: one per reason template (see _REASONS below for the mapping).
cdef enum:
    E_NONE = 0
    E_TOO_LONG
    E_EMPTY
    E_NOT_ASCII
    E_AIM_INCOMPLETE
    E_AIM_UNSUPPORTED
    E_AIM_UNSUPPORTED_ANON
    E_AIM_EMPTY
    E_CN_CHAR
    E_CN_LEN
    E_CN_PREFIX
    E_URL_NONE
    E_URL_MANY
    E_DL_PAIRS
    E_DL_GTIN_LEN
    E_DL_PERCENT
    E_DL_QUERY_AI
    E_GS1_EXPECT_AI
    E_GS1_INCOMPLETE_AI
    E_GS1_UNKNOWN_AI
    E_GS1_EXPECT_PAREN
    E_GS1_BAD_GROUP
    E_GS1_DUPLICATE
    E_GS1_TOO_MANY
    E_GS1_NO_GTIN
    E_GS1_NO_SERIAL
    E_AI_FIXED_LEN
    E_AI_EMPTY
    E_AI_MAX_LEN
    E_AI_MIN_LEN
    E_AI_DIGIT
    E_AI_SET82
    E_AI_CHECK
    E_AI_MONTH
    E_AI_DAY

# AI table as C arrays: index by the AI's numeric value for each AI width.
cdef short _ai2[100]
cdef short _ai3[1000]
cdef short _ai4[10000]
cdef int _ai_lo[MAX_AI]
cdef int _ai_hi[MAX_AI]
cdef int _ai_kind[MAX_AI]
cdef bint _ai_predef[MAX_AI]
cdef int _ai_width[MAX_AI]
cdef bint _ai_dl_qualifier[MAX_AI]
cdef int _prefix_width[100]
cdef bint _set82[256]
cdef bint _strip_ascii[128]
cdef int _idx_gtin, _idx_serial, _idx_batch, _idx_expiry
cdef unsigned char _gs
cdef unsigned char _aim_code[MAX_AIM][3]
cdef int _aim_mode[MAX_AIM]
cdef int _n_aim
cdef bint _dl_gtin_len[15]
cdef unsigned char _url_before[256]
cdef unsigned char _url_after[256]
cdef long _fw_first, _fw_last, _fw_offset, _ideo_space
cdef long _strip_wide[MAX_STRIP_WIDE]
cdef int _n_strip_wide = 0
cdef int _cn20_len = T.CN20_LENGTH


cdef void _init_tables() except *:
    global _idx_gtin, _idx_serial, _idx_batch, _idx_expiry, _gs, _n_aim
    global _fw_first, _fw_last, _fw_offset, _ideo_space, _n_strip_wide
    if T.MAX_ELEMENTS != MAX_ELEMENTS:
        raise ImportError("tables.MAX_ELEMENTS differs from the compiled MAX_ELEMENTS")
    if len(T.AI_TABLE) > MAX_AI:
        raise ImportError("AI table larger than the compiled MAX_AI")
    memset(_ai2, 0xFF, sizeof(_ai2))
    memset(_ai3, 0xFF, sizeof(_ai3))
    memset(_ai4, 0xFF, sizeof(_ai4))
    cdef int i = 0
    for ai, (lo, hi, kind) in sorted(T.AI_TABLE.items()):
        width = len(ai)
        if width == 2:
            _ai2[int(ai)] = i
        elif width == 3:
            _ai3[int(ai)] = i
        else:
            _ai4[int(ai)] = i
        _ai_lo[i] = lo
        _ai_hi[i] = hi
        _ai_kind[i] = kind
        _ai_predef[i] = ai[:2] in T.PREDEFINED_LENGTH
        _ai_width[i] = width
        _ai_dl_qualifier[i] = ai in T.DL_QUALIFIERS
        i += 1
    _idx_gtin = _ai2[int(T.AI_GTIN)]
    _idx_serial = _ai2[int(T.AI_SERIAL)]
    _idx_batch = _ai2[int(T.AI_BATCH)]
    _idx_expiry = _ai2[int(T.AI_EXPIRY)]
    if T.DL_PRIMARY != T.AI_GTIN:
        raise ImportError("Digital Link primary key must be AI 01")
    for i in range(100):
        _prefix_width[i] = T.AI_LENGTH_BY_PREFIX.get("%02d" % i, T.AI_LENGTH_DEFAULT)
    memset(_set82, 0, sizeof(_set82))
    for c in T.CHARSET82:
        _set82[ord(c)] = True
    memset(_strip_ascii, 0, sizeof(_strip_ascii))
    for c in T.STRIP_CHARS:
        if ord(c) < 128:
            _strip_ascii[ord(c)] = True
        else:
            if _n_strip_wide >= MAX_STRIP_WIDE:
                raise ImportError("too many non-ASCII strip characters")
            _strip_wide[_n_strip_wide] = ord(c)
            _n_strip_wide += 1
    _gs = ord(T.GS)
    _n_aim = 0
    for code, mode in T.AIM_IDENTIFIERS.items():
        for i in range(3):
            _aim_code[_n_aim][i] = ord(code[i])
        _aim_mode[_n_aim] = mode
        _n_aim += 1
    if (T.AIM_CN20, T.AIM_PLAIN2D, T.AIM_GS1) != (MODE_CN20, MODE_PLAIN2D, MODE_GS1):
        raise ImportError("AIM modes in tables.py differ from the compiled ones")
    if (T.K_DIGITS, T.K_SET82, T.K_DATE, T.K_CHECKED) != (K_DIGITS, K_SET82, K_DATE, K_CHECKED):
        raise ImportError("AI content kinds in tables.py differ from the compiled ones")
    memset(_dl_gtin_len, 0, sizeof(_dl_gtin_len))
    for i in T.DL_GTIN_LENGTHS:
        _dl_gtin_len[i] = True
    memset(_url_before, 0, sizeof(_url_before))
    memset(_url_after, 0, sizeof(_url_after))
    for c in T.URL_CODE_BEFORE:
        _url_before[ord(c)] = 1
    for c in T.URL_CODE_AFTER:
        _url_after[ord(c)] = 1
    if T.URL_SCHEMES != ("http://", "https://"):
        raise ImportError("URL schemes in tables.py differ from the compiled ones")
    _fw_first = T.FULLWIDTH_FIRST
    _fw_last = T.FULLWIDTH_LAST
    _fw_offset = T.FULLWIDTH_OFFSET
    _ideo_space = T.IDEOGRAPHIC_SPACE


_init_tables()

# --- the local clock's year, for profiles without a ref_date ---------------------------------------

cdef time_t _year_at = -1
cdef int _year_value = 0


cdef int _today_year() noexcept nogil:
    # Same source as datetime.date.today() (localtime of the current second), cached per second.
    global _year_at, _year_value
    cdef time_t now = time(NULL)
    cdef tm parts
    if now != _year_at:
        localtime_r(&now, &parts)
        _year_value = parts.tm_year + 1900
        _year_at = now
    return _year_value

# --- compiled profile -------------------------------------------------------------------------------


cdef class _CProfile:
    """C view of a Profile: admitted prefixes, separators, reference year, size limit."""
    cdef object profile
    cdef bint any_prefix
    cdef bint admit[10]
    cdef int nsubs
    cdef bytes blob
    cdef Py_ssize_t* sub_off
    cdef Py_ssize_t* sub_len
    cdef bint first[256]
    cdef int fixed_year
    cdef Py_ssize_t max_length
    cdef bytes admitted_b
    cdef const char* admitted
    cdef Py_ssize_t admitted_n

    def __cinit__(self, profile):
        self.profile = profile
        self.sub_off = NULL
        self.sub_len = NULL
        prefixes = profile.cn_prefixes
        self.any_prefix = len(prefixes) == 0
        cdef int i
        for i in range(10):
            self.admit[i] = str(i) in prefixes
        subs = profile.gs_substitutes
        self.nsubs = len(subs)
        self.blob = "".join(subs).encode("ascii")
        self.sub_off = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (self.nsubs + 1))
        self.sub_len = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (self.nsubs + 1))
        if self.sub_off == NULL or self.sub_len == NULL:
            raise MemoryError()
        memset(self.first, 0, sizeof(self.first))
        cdef Py_ssize_t off = 0
        for i in range(self.nsubs):
            self.sub_off[i] = off
            self.sub_len[i] = len(subs[i])
            self.first[ord(subs[i][0])] = True
            off += len(subs[i])
        self.fixed_year = profile.ref_date.year if profile.ref_date is not None else 0
        self.max_length = profile.max_length
        self.admitted_b = ", ".join(prefixes).encode("ascii")
        self.admitted = self.admitted_b
        self.admitted_n = len(self.admitted_b)

    def __dealloc__(self):
        free(self.sub_off)
        free(self.sub_len)


# The last compiled profile, checked by identity: one reference, so a thread switch can never pair
# a profile with another profile's compiled view.
cdef _CProfile _last_cprofile = None
cdef dict _cprofiles = {}


cdef _CProfile _compiled(object profile):
    global _last_cprofile
    cdef _CProfile cp = _last_cprofile
    if profile is None:
        profile = DEFAULT_PROFILE
    if cp is not None and cp.profile is profile:
        return cp
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be a Profile or None, not {type(profile).__name__}")
    cp = _cprofiles.get(profile)
    if cp is None:
        if len(_cprofiles) >= 256:  # a server has a handful; do not grow without bound
            _cprofiles.clear()
        cp = _CProfile(profile)
        _cprofiles[profile] = cp
    _last_cprofile = cp
    return cp

# --- parse state --------------------------------------------------------------------------------------

cdef struct Field:
    int ai
    cstr p
    Py_ssize_t n

cdef struct State:
    cstr s                  # the scan after normalising and stripping (ASCII)
    Py_ssize_t n
    unsigned char* scratch  # percent-decoded values and padded GTINs (Digital Link only)
    Py_ssize_t used
    unsigned char* stack    # caller's stack area the scratch can use
    unsigned char* heap     # malloc'ed scratch to free, or NULL
    int kind
    cstr code               # CN20: the 20 digits
    Field fields[MAX_ELEMENTS]
    int nfields
    int ref_year            # 0 until a date needs it
    int expiry
    int gtin_i, serial_i, batch_i
    # rejection fields
    int err
    int ai
    Py_ssize_t pos
    Py_ssize_t num
    Py_ssize_t num2
    long ch
    cstr txt
    Py_ssize_t txt_n


cdef inline int _fail(State* st, int err) noexcept nogil:
    st.err = err
    return -1


cdef inline bint _digit(unsigned char c) noexcept nogil:
    return c >= 48 and c <= 57


cdef inline bint _printable(unsigned char c) noexcept nogil:
    return c > 32 and c < 127


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    if c >= 65 and c <= 90:
        return c + 32
    return c

# --- top level ----------------------------------------------------------------------------------------


cdef int _parse_text(State* st, _CProfile cp) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t n = st.n
    cdef int mode = MODE_AUTO
    cdef Py_ssize_t off = 0
    cdef int k
    if n == 0:
        return _fail(st, E_EMPTY)
    if s[0] == 93:  # ']'
        if n < 3:
            return _fail(st, E_AIM_INCOMPLETE)
        for k in range(_n_aim):
            if s[1] == _aim_code[k][1] and s[2] == _aim_code[k][2]:
                mode = _aim_mode[k]
                break
        if mode == MODE_AUTO:
            if _printable(s[1]) and _printable(s[2]):
                st.txt = s
                st.txt_n = 3
                return _fail(st, E_AIM_UNSUPPORTED)
            return _fail(st, E_AIM_UNSUPPORTED_ANON)
        if n == 3:
            st.txt = s
            st.txt_n = 3
            return _fail(st, E_AIM_EMPTY)
        off = 3
    if mode == MODE_CN20:
        return _cn20(st, cp, off)
    if mode == MODE_PLAIN2D:
        if _is_url(s, n, off):
            return _url(st, cp, off)
        return _cn20(st, cp, off)
    if mode == MODE_GS1:
        if s[off] == 40:  # '('
            return _parenthesised(st, cp, off)
        return _element_string(st, cp, off)
    return _auto(st, cp)


cdef int _auto(State* st, _CProfile cp) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t n = st.n
    cdef Py_ssize_t i
    if _is_url(s, n, 0):
        return _url(st, cp, 0)
    if s[0] == 40:
        return _parenthesised(st, cp, 0)
    for i in range(n):
        if _sep_at(st, cp, i):
            return _element_string(st, cp, 0)
    if n >= 2 and s[0] == 48 and s[1] == 49:  # "01"
        if not (n == _cn20_len and _all_digits(s, n) and _admits(cp, 48)):
            return _element_string(st, cp, 0)
    return _cn20(st, cp, 0)


cdef inline bint _all_digits(cstr s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if not _digit(s[i]):
            return False
    return True

# --- 20-digit Chinese code ----------------------------------------------------------------------------


cdef inline bint _admits(_CProfile cp, unsigned char d) noexcept:
    return cp.any_prefix or cp.admit[d - 48]


cdef int _cn20(State* st, _CProfile cp, Py_ssize_t off) noexcept:
    cdef cstr code = st.s + off
    cdef Py_ssize_t m = st.n - off
    cdef Py_ssize_t i
    for i in range(m):
        if not _digit(code[i]):
            st.ch = code[i]
            st.pos = i + 1
            return _fail(st, E_CN_CHAR)
    if m != _cn20_len:
        st.num = m
        return _fail(st, E_CN_LEN)
    return _cn20_result(st, cp, code)


cdef int _cn20_result(State* st, _CProfile cp, cstr code) noexcept:
    if not _admits(cp, code[0]):
        st.ch = code[0]
        return _fail(st, E_CN_PREFIX)
    st.code = code
    st.kind = KIND_CN20_C
    return 0

# --- URLs ---------------------------------------------------------------------------------------------


cdef bint _ci_prefix(cstr s, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t i
    if n < m:
        return False
    for i in range(m):
        if _lower(s[i]) != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint _is_url(cstr s, Py_ssize_t n, Py_ssize_t off) noexcept nogil:
    return _ci_prefix(s + off, n - off, "http://", 7) or _ci_prefix(s + off, n - off, "https://", 8)


cdef inline bint _seg_is(cstr s, Py_ssize_t a, Py_ssize_t b, const char* lit) noexcept nogil:
    return b - a == 2 and s[a] == <unsigned char>lit[0] and s[a + 1] == <unsigned char>lit[1]


cdef int _lookup_exact(cstr p, Py_ssize_t m) noexcept nogil:
    """AI index of exactly these characters, or -1."""
    cdef int v = 0
    cdef Py_ssize_t i
    if m < 2 or m > 4:
        return -1
    for i in range(m):
        if not _digit(p[i]):
            return -1
        v = v * 10 + (p[i] - 48)
    if m == 2:
        return _ai2[v]
    if m == 3:
        return _ai3[v]
    return _ai4[v]


cdef int _url(State* st, _CProfile cp, Py_ssize_t off) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t n = st.n
    cdef Py_ssize_t i = off + (7 if _ci_prefix(s + off, n - off, "http://", 7) else 8)
    cdef Py_ssize_t path_start, path_end, q0 = -1, q1 = -1, j
    while i < n and s[i] != 47 and s[i] != 63 and s[i] != 35:  # authority ends at / ? #
        i += 1
    path_start = i
    while i < n and s[i] != 63 and s[i] != 35:
        i += 1
    path_end = i
    if i < n and s[i] == 63:
        j = i + 1
        while j < n and s[j] != 35:
            j += 1
        q0 = i + 1
        q1 = j
    # Path segments as [seg[2k], seg[2k+1]) bounds.
    cdef Py_ssize_t stack_segs[128]
    cdef Py_ssize_t* seg = stack_segs
    cdef Py_ssize_t count = 0, a, b, slashes = 0
    cdef int rc
    if path_start < path_end:
        for b in range(path_start, path_end):
            if s[b] == 47:
                slashes += 1
        if slashes * 2 > 128:
            seg = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * slashes * 2)
            if seg == NULL:
                return _fail(st, E_URL_NONE)  # cannot happen in practice; never raise
        a = path_start + 1
        for b in range(a, path_end + 1):
            if b == path_end or s[b] == 47:
                seg[2 * count] = a
                seg[2 * count + 1] = b
                count += 1
                a = b + 1
        if seg[2 * count - 2] == seg[2 * count - 1]:
            count -= 1
    rc = _url_segments(st, cp, seg, count, path_start, q0, q1)
    if seg != stack_segs:
        free(seg)
    return rc


cdef int _url_segments(State* st, _CProfile cp, Py_ssize_t* seg, Py_ssize_t count,
                       Py_ssize_t path_start, Py_ssize_t q0, Py_ssize_t q1) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t first = -1, i, k, runs = 0
    cdef int idx
    cdef cstr run = NULL
    cdef bint ok
    for i in range(count):
        if not _seg_is(s, seg[2 * i], seg[2 * i + 1], "01") or (count - i) % 2:
            continue
        ok = True
        k = i + 2
        while k < count:
            idx = _lookup_exact(s + seg[2 * k], seg[2 * k + 1] - seg[2 * k])
            if idx < 0 or not _ai_dl_qualifier[idx]:
                ok = False
                break
            k += 2
        if ok:
            first = i
            break
    if first >= 0:
        return _digital_link(st, cp, seg, count, first, q0, q1)
    runs = _code_runs(s, st.n, path_start, &run)
    if runs == 1:
        return _cn20_result(st, cp, run)
    if runs > 1:
        st.num = runs
        return _fail(st, E_URL_MANY)
    for i in range(count):
        if _seg_is(s, seg[2 * i], seg[2 * i + 1], "01"):
            return _fail(st, E_DL_PAIRS)
    return _fail(st, E_URL_NONE)


cdef Py_ssize_t _code_runs(cstr s, Py_ssize_t n, Py_ssize_t start, cstr* first) noexcept nogil:
    """Count the 20-digit runs that are a whole path segment or query value; first one out."""
    cdef Py_ssize_t i = start, j, runs = 0
    while i < n:
        if not _digit(s[i]):
            i += 1
            continue
        j = i
        while j < n and _digit(s[j]):
            j += 1
        if j - i == _cn20_len and _url_before[s[i - 1]] and (j == n or _url_after[s[j]]):
            if runs == 0:
                first[0] = s + i
            runs += 1
        i = j
    return runs


cdef inline int _hexval(unsigned char c) noexcept nogil:
    if c >= 48 and c <= 57:
        return c - 48
    if c >= 97 and c <= 102:
        return c - 87
    if c >= 65 and c <= 70:
        return c - 55
    return -1


cdef int _ensure_scratch(State* st) noexcept:
    # Decoded values never grow; a padded GTIN adds 14 bytes per >= 8 input characters.
    cdef Py_ssize_t need = 3 * st.n + 32
    if st.scratch != NULL:
        return 0
    if need <= STACK_BYTES:
        st.scratch = st.stack
    else:
        st.heap = <unsigned char*>malloc(need)
        st.scratch = st.heap
    st.used = 0
    return 0 if st.scratch != NULL else -1


cdef int _percent_decode(State* st, Py_ssize_t a, Py_ssize_t b, cstr* out, Py_ssize_t* out_n) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t i
    cdef unsigned char* w
    cdef int hi, lo
    for i in range(a, b):
        if s[i] == 37:
            break
    else:
        out[0] = s + a
        out_n[0] = b - a
        return 0
    w = st.scratch + st.used
    out[0] = w
    i = a
    while i < b:
        if s[i] != 37:
            w[0] = s[i]
            w += 1
            i += 1
            continue
        hi = _hexval(s[i + 1]) if i + 3 <= b else -1
        lo = _hexval(s[i + 2]) if hi >= 0 else -1
        if lo < 0:
            st.pos = i + 1
            return _fail(st, E_DL_PERCENT)
        w[0] = <unsigned char>(hi * 16 + lo)
        w += 1
        i += 3
    out_n[0] = w - out[0]
    st.used += out_n[0]
    return 0


cdef int _digital_link(State* st, _CProfile cp, Py_ssize_t* seg, Py_ssize_t count,
                       Py_ssize_t first, Py_ssize_t q0, Py_ssize_t q1) noexcept:
    cdef cstr s = st.s
    cdef cstr v = s
    cdef Py_ssize_t vn = 0, k, q, stop, eq, key_end, j
    cdef int ai
    if _ensure_scratch(st) < 0:
        return _fail(st, E_URL_NONE)
    k = first
    while k < count:
        ai = _lookup_exact(s + seg[2 * k], seg[2 * k + 1] - seg[2 * k])
        if _percent_decode(st, seg[2 * k + 2], seg[2 * k + 3], &v, &vn) < 0:
            return -1
        if _dl_element(st, cp, ai, v, vn) < 0:
            return -1
        k += 2
    if q0 >= 0:
        q = q0
        while q <= q1:
            stop = q1
            for j in range(q, q1):
                if s[j] == 38:  # '&'
                    stop = j
                    break
            eq = -1
            for j in range(q, stop):
                if s[j] == 61:  # '='
                    eq = j
                    break
            key_end = stop if eq < 0 else eq
            if key_end > q and _all_digits(s + q, key_end - q):
                ai = _lookup_exact(s + q, key_end - q)
                if ai < 0:
                    st.txt = s + q
                    st.txt_n = key_end - q
                    st.pos = q + 1
                    return _fail(st, E_DL_QUERY_AI)
                if eq >= 0:
                    if _percent_decode(st, key_end + 1, stop, &v, &vn) < 0:
                        return -1
                else:
                    v = s + q
                    vn = 0
                if _dl_element(st, cp, ai, v, vn) < 0:
                    return -1
            q = stop + 1
    return _gs1_result(st, cp)


cdef int _dl_element(State* st, _CProfile cp, int ai, cstr v, Py_ssize_t vn) noexcept:
    cdef Py_ssize_t i
    cdef unsigned char* w
    if ai == _idx_gtin:
        for i in range(vn):
            if not _digit(v[i]):
                st.ai = ai
                st.ch = v[i]
                st.pos = i + 1
                return _fail(st, E_AI_DIGIT)
        if vn > 14 or not _dl_gtin_len[vn]:
            st.num = vn
            return _fail(st, E_DL_GTIN_LEN)
        if vn < 14:  # left-pad GTIN-8/12/13 to the GTIN-14 carried in AI 01
            w = st.scratch + st.used
            memset(w, 48, 14 - vn)
            memcpy(w + 14 - vn, v, vn)
            st.used += 14
            v = w
            vn = 14
    if _validate(st, cp, ai, v, vn) < 0:
        return -1
    return _merge(st, ai, v, vn)

# --- GS1 element strings ------------------------------------------------------------------------------


cdef inline Py_ssize_t _sep_at(State* st, _CProfile cp, Py_ssize_t p) noexcept:
    """Length of the separator (GS or a profile substitute) starting at p, else 0."""
    cdef unsigned char c
    cdef int k
    cdef Py_ssize_t m
    cdef const char* blob
    if p >= st.n:
        return 0
    c = st.s[p]
    if c == _gs:
        return 1
    if not cp.first[c]:
        return 0
    blob = cp.blob
    for k in range(cp.nsubs):
        m = cp.sub_len[k]
        if m <= st.n - p and memcmp(st.s + p, blob + cp.sub_off[k], m) == 0:
            return m
    return 0


cdef inline Py_ssize_t _skip_seps(State* st, _CProfile cp, Py_ssize_t p) noexcept:
    cdef Py_ssize_t m = _sep_at(st, cp, p)
    while m:
        p += m
        m = _sep_at(st, cp, p)
    return p


cdef int _element_string(State* st, _CProfile cp, Py_ssize_t off) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t n = st.n
    cdef Py_ssize_t p = _skip_seps(st, cp, off)  # a transmitted leading FNC1 is tolerated
    cdef Py_ssize_t vs, e, want
    cdef int ai
    while p < n:
        ai = _read_ai(st, p)
        if ai < 0:
            return -1
        vs = p + _ai_width[ai]
        e = vs
        if _ai_predef[ai]:
            # Predefined length: exactly that many characters, no separator needed after them.
            want = _ai_hi[ai]
            while e < n and e - vs < want and not _sep_at(st, cp, e):
                e += 1
            if e - vs < want:
                st.ai = ai
                st.num = e - vs
                st.num2 = want
                return _fail(st, E_AI_FIXED_LEN)
        elif cp.nsubs == 0:
            while e < n and s[e] != _gs:
                e += 1
        else:
            while e < n and not _sep_at(st, cp, e):
                e += 1
        p = _skip_seps(st, cp, e)  # repeated separators carry nothing: tolerated
        if _validate(st, cp, ai, s + vs, e - vs) < 0:
            return -1
        if _merge(st, ai, s + vs, e - vs) < 0:
            return -1
    return _gs1_result(st, cp)


cdef int _read_ai(State* st, Py_ssize_t p) noexcept:
    """Index of the AI starting at p (2, 3 or 4 digits; GS1 AIs are prefix-free), or -1."""
    cdef cstr s = st.s
    cdef int digits = 0, v = 0, idx, width
    if not _digit(s[p]):
        st.pos = p + 1
        st.ch = s[p]
        return _fail(st, E_GS1_EXPECT_AI)
    while digits < 4 and p + digits < st.n and _digit(s[p + digits]):
        v = v * 10 + (s[p + digits] - 48)
        digits += 1
        if digits == 2:
            idx = _ai2[v]
        elif digits == 3:
            idx = _ai3[v]
        elif digits == 4:
            idx = _ai4[v]
        else:
            idx = -1
        if idx >= 0:
            return idx
    if digits < 2:
        st.pos = p + 1
        return _fail(st, E_GS1_INCOMPLETE_AI)
    width = _prefix_width[(s[p] - 48) * 10 + (s[p + 1] - 48)]
    st.txt = s + p
    st.txt_n = width if width < digits else digits
    st.pos = p + 1
    return _fail(st, E_GS1_UNKNOWN_AI)


cdef Py_ssize_t _group_end(cstr s, Py_ssize_t n, Py_ssize_t p) noexcept nogil:
    """Index of ')' if an '(' + 2-4 digits + ')' AI group starts at p, else -1."""
    cdef Py_ssize_t j
    if s[p] != 40:
        return -1
    j = p + 1
    while j < n and j - p - 1 < 4 and _digit(s[j]):
        j += 1
    if j - p - 1 >= 2 and j < n and s[j] == 41:
        return j
    return -1


cdef int _parenthesised(State* st, _CProfile cp, Py_ssize_t off) noexcept:
    cdef cstr s = st.s
    cdef Py_ssize_t n = st.n
    cdef Py_ssize_t p = off, close, e
    cdef int ai
    while p < n:
        if s[p] != 40:
            st.pos = p + 1
            st.ch = s[p]
            return _fail(st, E_GS1_EXPECT_PAREN)
        close = _group_end(s, n, p)
        if close < 0:
            st.pos = p + 1
            return _fail(st, E_GS1_BAD_GROUP)
        ai = _lookup_exact(s + p + 1, close - p - 1)
        if ai < 0:
            st.txt = s + p + 1
            st.txt_n = close - p - 1
            st.pos = p + 2
            return _fail(st, E_GS1_UNKNOWN_AI)
        e = close + 1
        while e < n and (s[e] != 40 or _group_end(s, n, e) < 0):
            e += 1
        p = e
        if _validate(st, cp, ai, s + close + 1, e - close - 1) < 0:
            return -1
        if _merge(st, ai, s + close + 1, e - close - 1) < 0:
            return -1
    return _gs1_result(st, cp)

# --- AI values ----------------------------------------------------------------------------------------


cdef inline int _ref_year(State* st, _CProfile cp) noexcept:
    if st.ref_year == 0:
        st.ref_year = cp.fixed_year if cp.fixed_year else _today_year()
    return st.ref_year


cdef inline int _check_digit(cstr body, Py_ssize_t m) noexcept nogil:
    # Weights 3,1,3,1... from the rightmost digit of the body (the one next to the check digit).
    cdef int total = 0, weight = 3
    cdef Py_ssize_t i = m - 1
    while i >= 0:
        total += (body[i] - 48) * weight
        weight = 4 - weight
        i -= 1
    return (10 - total % 10) % 10


cdef inline int _century_year(int yy, int ref) noexcept nogil:
    # GS1 Gen Specs 7.12: YY is the year within -49..+50 of the reference year.
    cdef int cy = ref % 100
    cdef int base = ref - cy
    cdef int diff = yy - cy
    if diff > 50:
        base -= 100
    elif diff < -49:
        base += 100
    return base + yy


cdef inline int _days_in_month(int year, int month) noexcept nogil:
    if month == 2:
        if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
            return 29
        return 28
    if month == 4 or month == 6 or month == 9 or month == 11:
        return 30
    return 31


cdef int _validate(State* st, _CProfile cp, int ai, cstr v, Py_ssize_t m) noexcept:
    cdef int lo = _ai_lo[ai], hi = _ai_hi[ai], kind = _ai_kind[ai]
    cdef Py_ssize_t i
    cdef int want, month, year
    st.ai = ai
    if lo == hi:
        if m != lo:
            st.num = m
            st.num2 = lo
            return _fail(st, E_AI_FIXED_LEN)
    elif m == 0:
        return _fail(st, E_AI_EMPTY)
    elif m > hi:
        st.num = m
        st.num2 = hi
        return _fail(st, E_AI_MAX_LEN)
    elif m < lo:
        st.num = m
        st.num2 = lo
        return _fail(st, E_AI_MIN_LEN)
    if kind == K_SET82:
        for i in range(m):
            if not _set82[v[i]]:
                st.ch = v[i]
                st.pos = i + 1
                return _fail(st, E_AI_SET82)
        return 0
    for i in range(m):
        if not _digit(v[i]):
            st.ch = v[i]
            st.pos = i + 1
            return _fail(st, E_AI_DIGIT)
    if kind == K_CHECKED:
        want = _check_digit(v, m - 1)
        if want != v[m - 1] - 48:
            st.num2 = want
            st.ch = v[m - 1]
            return _fail(st, E_AI_CHECK)
    elif kind == K_DATE:
        month = (v[2] - 48) * 10 + (v[3] - 48)
        if month < 1 or month > 12:
            st.txt = v
            st.txt_n = 6
            return _fail(st, E_AI_MONTH)
        year = _century_year((v[0] - 48) * 10 + (v[1] - 48), _ref_year(st, cp))
        if (v[4] - 48) * 10 + (v[5] - 48) > _days_in_month(year, month):
            st.txt = v
            st.txt_n = 6
            st.num = year
            return _fail(st, E_AI_DAY)
    return 0


cdef int _merge(State* st, int ai, cstr v, Py_ssize_t m) noexcept:
    cdef int k
    for k in range(st.nfields):
        if st.fields[k].ai == ai:
            if st.fields[k].n == m and memcmp(st.fields[k].p, v, m) == 0:
                return 0
            st.ai = ai
            return _fail(st, E_GS1_DUPLICATE)
    if st.nfields >= MAX_ELEMENTS:
        st.num2 = MAX_ELEMENTS
        return _fail(st, E_GS1_TOO_MANY)
    st.fields[st.nfields].ai = ai
    st.fields[st.nfields].p = v
    st.fields[st.nfields].n = m
    st.nfields += 1
    return 0


cdef int _gs1_result(State* st, _CProfile cp) noexcept:
    cdef int k, ai, year, month, day
    cdef cstr v
    st.gtin_i = st.serial_i = st.batch_i = -1
    st.expiry = 0
    for k in range(st.nfields):
        ai = st.fields[k].ai
        if ai == _idx_gtin:
            st.gtin_i = k
        elif ai == _idx_serial:
            st.serial_i = k
        elif ai == _idx_batch:
            st.batch_i = k
        elif ai == _idx_expiry:
            v = st.fields[k].p
            year = _century_year((v[0] - 48) * 10 + (v[1] - 48), _ref_year(st, cp))
            month = (v[2] - 48) * 10 + (v[3] - 48)
            day = (v[4] - 48) * 10 + (v[5] - 48)
            if day == 0:
                day = _days_in_month(year, month)
            st.expiry = year * 10000 + month * 100 + day
    if st.gtin_i < 0:
        return _fail(st, E_GS1_NO_GTIN)
    if st.serial_i < 0:
        return _fail(st, E_GS1_NO_SERIAL)
    st.kind = KIND_GS1_C
    return 0

# --- building the result --------------------------------------------------------------------------------


cdef inline str _ascii(cstr p, Py_ssize_t n):
    cdef object out
    if n == 0:
        return ""
    out = PyUnicode_New(n, 127)
    memcpy(PyUnicode_1BYTE_DATA(out), p, n)
    return out


# --- reasons --------------------------------------------------------------------------------------------
# The templates of tables.py, pre-split at import into literal pieces and field slots, rendered into
# a C buffer: a rejection costs one str allocation instead of a str.format call. Each template field
# name reads one fixed State member (see _field_ids), which the parse functions fill accordingly.

_TEMPLATE_NAMES = [
    None, "R_TOO_LONG", "R_EMPTY", "R_NOT_ASCII", "R_AIM_INCOMPLETE", "R_AIM_UNSUPPORTED",
    "R_AIM_UNSUPPORTED_ANON", "R_AIM_EMPTY", "R_CN_CHAR", "R_CN_LEN", "R_CN_PREFIX", "R_URL_NONE",
    "R_URL_MANY", "R_DL_PAIRS", "R_DL_GTIN_LEN", "R_DL_PERCENT", "R_DL_QUERY_AI",
    "R_GS1_EXPECT_AI", "R_GS1_INCOMPLETE_AI", "R_GS1_UNKNOWN_AI", "R_GS1_EXPECT_PAREN",
    "R_GS1_BAD_GROUP", "R_GS1_DUPLICATE", "R_GS1_TOO_MANY", "R_GS1_NO_GTIN", "R_GS1_NO_SERIAL",
    "R_AI_FIXED_LEN", "R_AI_EMPTY", "R_AI_MAX_LEN", "R_AI_MIN_LEN", "R_AI_DIGIT", "R_AI_SET82",
    "R_AI_CHECK", "R_AI_MONTH", "R_AI_DAY",
]

cdef enum:
    F_NONE = 0
    F_N          # st.num
    F_NUM2       # max / min / exp: st.num2
    F_POS        # st.pos
    F_CH         # show_char(st.ch)
    F_CHAR       # d / got: the character st.ch itself
    F_AIM        # st.txt
    F_AI         # st.txt for an AI not in the table, else the name of AI st.ai
    F_LABEL      # check-digit label of AI st.ai
    F_ADMITTED   # the profile's admitted prefixes
    F_MM         # st.txt[2:4] (a YYMMDD value)
    F_DD         # st.txt[4:6]
    F_VALUE      # st.txt[0:6]
    F_YYYY       # st.num

_field_ids = {"n": F_N, "max": F_NUM2, "min": F_NUM2, "exp": F_NUM2, "pos": F_POS, "ch": F_CH,
              "d": F_CHAR, "got": F_CHAR, "aim": F_AIM, "ai": F_AI, "label": F_LABEL,
              "admitted": F_ADMITTED, "mm": F_MM, "dd": F_DD, "value": F_VALUE, "yyyy": F_YYYY}

cdef enum:
    MAX_SEGS = 8
    N_ERRORS = E_AI_DAY + 1

cdef bytes _tpl_blob
cdef Py_ssize_t _tpl_off[N_ERRORS][MAX_SEGS]
cdef Py_ssize_t _tpl_len[N_ERRORS][MAX_SEGS]
cdef int _tpl_field[N_ERRORS][MAX_SEGS]
cdef int _tpl_nseg[N_ERRORS]
cdef char _ai_name[MAX_AI][5]
cdef char _ai_label[MAX_AI][16]


cdef void _init_reasons() except *:
    global _tpl_blob
    import string
    if len(_TEMPLATE_NAMES) != N_ERRORS:
        raise ImportError("reason templates out of step with the error codes")
    blob = bytearray()
    cdef int e, k
    for e in range(1, N_ERRORS):
        k = 0
        for literal, name, spec, conv in string.Formatter().parse(getattr(T, _TEMPLATE_NAMES[e])):
            if k >= MAX_SEGS or spec or conv:
                raise ImportError(f"template {_TEMPLATE_NAMES[e]} too complex for the compiled codec")
            _tpl_off[e][k] = len(blob)
            _tpl_len[e][k] = len(literal)
            blob += literal.encode("ascii")
            if name is not None and name not in _field_ids:
                raise ImportError(f"template {_TEMPLATE_NAMES[e]}: unknown field {name!r}")
            _tpl_field[e][k] = _field_ids[name] if name is not None else F_NONE
            k += 1
        _tpl_nseg[e] = k
    _tpl_blob = bytes(blob)
    for ai in T.AI_TABLE:
        idx = _lookup_exact(ai.encode("ascii"), len(ai))
        name = ai.encode("ascii")
        label = T.check_label(ai).encode("ascii")
        if len(label) >= 16:
            raise ImportError("check label too long")
        memcpy(_ai_name[idx], <const char*>name, len(name) + 1)
        memcpy(_ai_label[idx], <const char*>label, len(label) + 1)


cdef struct Buf:
    char* p
    Py_ssize_t n


cdef inline void _put_bytes(Buf* b, const char* s, Py_ssize_t m) noexcept nogil:
    memcpy(b.p + b.n, s, m)
    b.n += m


cdef inline void _put_int(Buf* b, long long v) noexcept nogil:
    b.n += snprintf(b.p + b.n, 24, "%lld", v)


cdef void _put_field(Buf* b, State* st, _CProfile cp, int field) noexcept:
    cdef char c
    if field == F_N or field == F_YYYY:
        _put_int(b, st.num)
    elif field == F_NUM2:
        _put_int(b, st.num2)
    elif field == F_POS:
        _put_int(b, st.pos)
    elif field == F_CH:
        # Same rendering as tables.show_char.
        if st.ch >= 0x20 and st.ch < 0x7F:
            c = <char>st.ch
            _put_bytes(b, "'", 1)
            _put_bytes(b, &c, 1)
            _put_bytes(b, "'", 1)
        else:
            b.n += snprintf(b.p + b.n, 16, "U+%04lX", st.ch)
    elif field == F_CHAR:
        c = <char>st.ch
        _put_bytes(b, &c, 1)
    elif field == F_AIM:
        _put_bytes(b, <const char*>st.txt, st.txt_n)
    elif field == F_AI:
        if st.err == E_GS1_UNKNOWN_AI or st.err == E_DL_QUERY_AI:
            _put_bytes(b, <const char*>st.txt, st.txt_n)
        else:
            _put_bytes(b, _ai_name[st.ai], strlen(_ai_name[st.ai]))
    elif field == F_LABEL:
        _put_bytes(b, _ai_label[st.ai], strlen(_ai_label[st.ai]))
    elif field == F_ADMITTED:
        _put_bytes(b, cp.admitted, cp.admitted_n)
    elif field == F_MM:
        _put_bytes(b, <const char*>st.txt + 2, 2)
    elif field == F_DD:
        _put_bytes(b, <const char*>st.txt + 4, 2)
    elif field == F_VALUE:
        _put_bytes(b, <const char*>st.txt, 6)


cdef str _reason(State* st, _CProfile cp):
    cdef char stack[512]
    cdef Buf b
    cdef int e = st.err, k
    cdef const char* blob = _tpl_blob
    # Longest rendering: literals (< 100) + a few numbers, chars and AI names (< 150), plus the
    # only unbounded field, an AI or symbology text taken from the scan (txt_n).
    cdef Py_ssize_t cap = 384 + (st.txt_n if st.err == E_DL_QUERY_AI else 0)
    b.p = &stack[0]
    if cap > 512:
        b.p = <char*>malloc(cap)
    if b.p == NULL:
        raise MemoryError()
    b.n = 0
    try:
        for k in range(_tpl_nseg[e]):
            _put_bytes(&b, blob + _tpl_off[e][k], _tpl_len[e][k])
            if _tpl_field[e][k] != F_NONE:
                _put_field(&b, st, cp, _tpl_field[e][k])
        return _ascii(<cstr>b.p, b.n)
    finally:
        if b.p != &stack[0]:
            free(b.p)


_init_reasons()


cdef object _K_MALFORMED = KIND_MALFORMED_C
cdef object _K_CN20 = KIND_CN20_C
cdef object _K_GS1 = KIND_GS1_C
cdef object _EMPTY = ""
cdef object _ZERO = 0


cdef inline void _put(object t, Py_ssize_t i, object o):
    Py_INCREF(o)  # PyTuple_SET_ITEM steals a reference
    PyTuple_SET_ITEM(t, i, o)


cdef tuple _pack(object kind, object key, object product, object serial, object batch,
                 object expiry, object reason):
    # The tuple holds only str and int, so it can never be part of a cycle: untracking it keeps
    # the cyclic GC from walking every result of a large parse_many batch again and again.
    t = PyTuple_New(7)
    _put(t, 0, kind)
    _put(t, 1, key)
    _put(t, 2, product)
    _put(t, 3, serial)
    _put(t, 4, batch)
    _put(t, 5, expiry)
    _put(t, 6, reason)
    PyObject_GC_UnTrack(t)
    return t


cdef object _gs1_key(State* st):
    """A parsed GS1 scan's canonical key: '01' + GTIN-14 + '21' + serial, built in place."""
    cdef Field* g = &st.fields[st.gtin_i]
    cdef Field* f = &st.fields[st.serial_i]
    cdef object key = PyUnicode_New(18 + f.n, 127)
    cdef unsigned char* w = PyUnicode_1BYTE_DATA(key)
    w[0] = 48
    w[1] = 49
    memcpy(w + 2, g.p, 14)
    w[16] = 50
    w[17] = 49
    memcpy(w + 18, f.p, f.n)
    return key


cdef tuple _result(State* st, _CProfile cp, object raw, bint raw_is_text):
    cdef Field* f
    cdef Field* g
    cdef object key
    if st.err:
        return _pack(_K_MALFORMED, _EMPTY, _EMPTY, _EMPTY, _EMPTY, _ZERO, _reason(st, cp))
    if st.kind == KIND_CN20_C:
        # A bare 20-digit scan is its own key: reuse the caller's str instead of copying it.
        if raw_is_text and st.code == st.s and st.n == 20 and PyUnicode_CheckExact(raw):
            key = raw
        else:
            key = _ascii(st.code, 20)
        return _pack(_K_CN20, key, _ascii(st.code, 7), _ascii(st.code + 7, 9), _EMPTY, _ZERO, _EMPTY)
    g = &st.fields[st.gtin_i]
    f = &st.fields[st.serial_i]
    batch = _ascii(st.fields[st.batch_i].p, st.fields[st.batch_i].n) if st.batch_i >= 0 else _EMPTY
    return _pack(_K_GS1, _gs1_key(st), _ascii(g.p, 14), _ascii(f.p, f.n), batch, st.expiry, _EMPTY)


cdef object _key_only(State* st, object raw, bint raw_is_text):
    """The canonical key alone ('' for a malformed scan): what `keys_many` returns, without the
    product, serial, batch and reason strings a full result builds."""
    if st.err:
        return _EMPTY
    if st.kind == KIND_CN20_C:
        if raw_is_text and st.code == st.s and st.n == 20 and PyUnicode_CheckExact(raw):
            return raw
        return _ascii(st.code, 20)
    return _gs1_key(st)


cdef object _parse_one(object raw, _CProfile cp, bint key_only=False):
    cdef State st
    cdef unsigned char stack_text[STACK_BYTES]
    cdef unsigned char stack_scratch[STACK_BYTES]
    cdef unsigned char* heap_text = NULL
    cdef Py_ssize_t rn
    cdef Py_ssize_t lo, hi
    cdef cstr data
    cdef bint raw_is_text = False
    st.err = E_NONE
    st.kind = KIND_MALFORMED_C
    st.nfields = 0
    st.ref_year = 0
    st.scratch = NULL
    st.heap = NULL
    st.stack = stack_scratch
    st.used = 0
    st.txt_n = 0
    PyUnicode_READY(raw)  # legacy (wstr) strings on 3.11; a no-op for every str built today
    rn = PyUnicode_GET_LENGTH(raw)
    if rn > cp.max_length:
        st.num = rn
        st.num2 = cp.max_length
        st.err = E_TOO_LONG
        return _key_only(&st, raw, False) if key_only else _result(&st, cp, raw, False)
    try:
        if PyUnicode_IS_ASCII(raw):
            data = PyUnicode_1BYTE_DATA(raw)
            lo = 0
            hi = rn
            while lo < hi and _strip_ascii[data[lo]]:
                lo += 1
            while hi > lo and _strip_ascii[data[hi - 1]]:
                hi -= 1
            st.s = data + lo
            st.n = hi - lo
            raw_is_text = lo == 0 and hi == rn
        else:
            if rn > STACK_BYTES:
                heap_text = <unsigned char*>malloc(rn)
                if heap_text == NULL:
                    raise MemoryError()
                st.s = heap_text
            else:
                st.s = stack_text
            if _normalise_wide(&st, raw, rn) < 0:
                return _key_only(&st, raw, False) if key_only else _result(&st, cp, raw, False)
        _parse_text(&st, cp)
        return _key_only(&st, raw, raw_is_text) if key_only else _result(&st, cp, raw, raw_is_text)
    finally:
        free(heap_text)
        free(st.heap)


cdef inline long _fold(long c) noexcept nogil:
    if c >= _fw_first and c <= _fw_last:
        return c - _fw_offset
    if c == _ideo_space:
        return 32
    return c


cdef inline bint _is_strip(long c) noexcept nogil:
    cdef int k
    if c < 128:
        return _strip_ascii[c]
    for k in range(_n_strip_wide):
        if c == _strip_wide[k]:
            return True
    return False


cdef int _normalise_wide(State* st, object raw, Py_ssize_t rn) except -2:
    """Slow path for non-ASCII scans: full-width to ASCII, strip, then insist on ASCII."""
    cdef int kind = PyUnicode_KIND(raw)
    cdef void* data = PyUnicode_DATA(raw)
    cdef Py_ssize_t lo = 0, hi = rn, i
    cdef long c
    cdef unsigned char* w = <unsigned char*>st.s
    while lo < hi and _is_strip(_fold(<long>PyUnicode_READ(kind, data, lo))):
        lo += 1
    while hi > lo and _is_strip(_fold(<long>PyUnicode_READ(kind, data, hi - 1))):
        hi -= 1
    for i in range(lo, hi):
        c = _fold(<long>PyUnicode_READ(kind, data, i))
        if c > 127:
            st.ch = c
            st.pos = i - lo + 1
            st.err = E_NOT_ASCII
            return -1
        w[i - lo] = <unsigned char>c
    st.n = hi - lo
    return 0

# --- public API -------------------------------------------------------------------------------------


def parse(raw, profile=None):
    """Parse one scan: (kind, key, product, serial, batch, expiry, reason). Never raises for str."""
    if not PyUnicode_Check(raw):
        raise TypeError(f"raw must be str, not {type(raw).__name__}")
    return _parse_one(raw, _compiled(profile))


def parse_many(raws, profile=None):
    """Parse a whole settlement or bulk chunk in one call: a list of `parse` results, in order."""
    cdef _CProfile cp = _compiled(profile)
    cdef list items = raws if type(raws) is list else list(raws)
    cdef list out = []
    cdef Py_ssize_t i, n = len(items)
    for i in range(n):
        raw = items[i]
        if not PyUnicode_Check(raw):
            raise TypeError(f"raw must be str, not {type(raw).__name__}")
        out.append(_parse_one(raw, cp))
    return out


def keys_many(raws, profile=None):
    """The canonical key of each scan, in order ('' where it is malformed): parse_many's KEY
    column without the rest of each result (the leads engine's columns of millions of scans)."""
    cdef _CProfile cp = _compiled(profile)
    cdef list items = raws if type(raws) is list else list(raws)
    cdef Py_ssize_t i, n = len(items)
    cdef list out = []
    for i in range(n):
        raw = items[i]
        if not PyUnicode_Check(raw):
            raise TypeError(f"raw must be str, not {type(raw).__name__}")
        out.append(_parse_one(raw, cp, True))
    return out


def gtin_check_digit(digits):
    """GS1 mod-10 check digit for the digits before it (e.g. the first 13 of a GTIN-14)."""
    if not PyUnicode_Check(digits):
        raise TypeError(f"digits must be str, not {type(digits).__name__}")
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"digits must be ASCII digits, got {digits!r}")
    b = digits.encode("ascii")
    return _check_digit(<cstr><const char*>b, len(b))
