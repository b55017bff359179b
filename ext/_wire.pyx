# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled settlement-path wire work: the twin of `wire_fallback.py`, which defines the
behaviour (tests/test_wire.py holds both to the same answers on generated inputs). The gain is
in the loops: decimal fields parsed in C without int()'s generality, ARGV built into a list of
its exact size, the digest's length-prefixed serialisation written into one buffer and hashed
with one call.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from libc.string cimport memcpy

import hashlib

from .wire_types import ACTIVE_STATUS, INT_FIELDS, OK_VERDICT, OWN, ROW_WIDTH, STATUS, VERDICT, Results

cdef object _blake2b = hashlib.blake2b
cdef object _Results = Results
cdef Py_ssize_t _WIDTH = ROW_WIDTH
cdef Py_ssize_t _OWN = OWN
cdef Py_ssize_t _VERDICT = VERDICT
cdef Py_ssize_t _STATUS = STATUS
cdef str _OK = OK_VERDICT
cdef str _ACTIVE = ACTIVE_STATUS
cdef bint _IS_INT[32]
for _i in range(32):
    _IS_INT[_i] = _i in INT_FIELDS
if ROW_WIDTH > 32:
    raise ImportError("tracecode.codec._wire: rows wider than 32 fields")

DEF RECORD_SEP = u"\x1e"
DEF FIELD_SEP = u"\x1f"


cdef object _int(str text):
    """As wire_fallback._int: '' for 0, else an optional '-' and ASCII digits only."""
    cdef Py_ssize_t n = len(text), i = 0, j
    cdef long long v = 0
    cdef Py_UCS4 c
    if n == 0:
        return 0
    if n and text[0] == u"-":
        i = 1
    if i >= n:
        raise ValueError(f"packed results: {text!r} is not a decimal integer")
    for j in range(i, n):
        c = text[j]
        if c < u"0" or c > u"9":
            raise ValueError(f"packed results: {text!r} is not a decimal integer")
        if n - i <= 18:
            v = v * 10 + (<long long>c - 48)
    if n - i > 18:  # beyond int64: validated above, converted by Python
        return int(text)
    return -v if i else v


def decode_results(str text, row_type, own=None):
    cdef list parts, f
    cdef list rows = []
    cdef str head
    cdef Py_ssize_t k, j, m, w
    parts = text.split(RECORD_SEP)
    head = parts[0]
    if head != u"0" and head != u"1":
        raise ValueError(f"packed results: recorded flag {head[:20]!r}, want '0' or '1'")
    m = len(parts)
    for k in range(1, m):
        f = (<str>parts[k]).split(FIELD_SEP)
        w = len(f)
        if w > _WIDTH:
            raise ValueError(f"packed results: a line of {w} fields, want at most {_WIDTH}")
        while w < _WIDTH:
            f.append(u"")
            w += 1
        if not f[_VERDICT]:
            if f[_STATUS]:
                raise ValueError(f"packed results: status {f[_STATUS][:20]!r} on a line written as OK")
            f[_VERDICT] = _OK
            f[_STATUS] = _ACTIVE
        if f[_OWN] == u"=":
            if own is None:
                raise ValueError("packed results: a record's own first dispense ('=') read without its owner")
            f[_OWN:_OWN + 3] = str(own[0]), str(own[1]), str(own[2])
        for j in range(_WIDTH):
            if _IS_INT[j]:
                f[j] = _int(<str>f[j])
        rows.append(row_type(*f))
    return _Results(head == u"1", rows)


def encode_results(recorded, rows):
    cdef list out = [u"1" if recorded else u"0"]
    cdef list fields
    cdef Py_ssize_t i
    for row in rows:
        if len(row) != _WIDTH:
            raise ValueError(f"a row of {len(row)} fields, want {_WIDTH}")
        fields = []
        i = 0
        for v in row:
            if _IS_INT[i]:
                if type(v) is not int:
                    raise TypeError(f"field {i}: {type(v).__name__}, want int")
                fields.append(str(v) if v else u"")
            else:
                if type(v) is not str:
                    raise TypeError(f"field {i}: {type(v).__name__}, want str")
                if RECORD_SEP in <str>v or FIELD_SEP in <str>v:
                    raise ValueError(f"field {i}: {v!r} holds a separator")
                fields.append(v)
            i += 1
        if not fields[_VERDICT]:
            raise ValueError(f"field {_VERDICT}: an empty verdict")
        if fields[_VERDICT] == _OK and fields[_STATUS] == _ACTIVE:
            fields[_VERDICT] = u""
            fields[_STATUS] = u""
        out.append(RECORD_SEP + FIELD_SEP.join(fields).rstrip(FIELD_SEP))
    return u"".join(out)


def verify_argv(fixed, lines, line_indexes, codes, tail):
    cdef tuple fx = tuple(fixed)
    cdef list ls = list(lines)
    cdef list idx = list(line_indexes)
    cdef tuple cs = tuple(codes)
    cdef tuple tl = tuple(tail)
    cdef Py_ssize_t n_lines = min(len(ls), len(idx))  # zip(): the shorter one
    cdef Py_ssize_t total = len(fx) + len(cs) + len(tl), k, pos = 0
    cdef list prepared = []
    cdef tuple line
    for k in range(n_lines):
        line = tuple(ls[k])
        prepared.append(line)
        total += len(line) + 1
    cdef list args = PyList_New(total)
    for v in fx:
        Py_INCREF(v)
        PyList_SET_ITEM(args, pos, v)
        pos += 1
    for k in range(n_lines):
        for v in <tuple>prepared[k]:
            Py_INCREF(v)
            PyList_SET_ITEM(args, pos, v)
            pos += 1
        v = idx[k]
        Py_INCREF(v)
        PyList_SET_ITEM(args, pos, v)
        pos += 1
    for v in cs:
        Py_INCREF(v)
        PyList_SET_ITEM(args, pos, v)
        pos += 1
    for v in tl:
        Py_INCREF(v)
        PyList_SET_ITEM(args, pos, v)
        pos += 1
    return args


cdef inline void _put(bytearray buf, Py_ssize_t* pos, bytes b):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef unsigned char* p = <unsigned char*>(<char*>buf) + pos[0]
    p[0] = (n >> 24) & 0xFF
    p[1] = (n >> 16) & 0xFF
    p[2] = (n >> 8) & 0xFF
    p[3] = n & 0xFF
    memcpy(p + 4, PyBytes_AS_STRING(b), n)
    pos[0] += 4 + n


def body_digest(site_id, settlement_id, at_ms, all_or_nothing, lines):
    cdef list enc = [site_id.encode("utf-8", "surrogatepass"), settlement_id.encode("utf-8", "surrogatepass"),
                     str(at_ms).encode("utf-8", "surrogatepass"), b"A" if all_or_nothing else b"R",
                     str(len(lines)).encode("utf-8", "surrogatepass")]
    cdef Py_ssize_t size = 0, pos = 0
    cdef bytes b
    for ln in lines:
        enc.append(ln.raw_code.encode("utf-8", "surrogatepass"))
        enc.append(ln.product_id.encode("utf-8", "surrogatepass"))
        enc.append(str(ln.units).encode("utf-8", "surrogatepass"))
    for b in enc:
        if PyBytes_GET_SIZE(b) > 0xFFFFFFFF:
            raise OverflowError("int too big to convert")
        size += 4 + PyBytes_GET_SIZE(b)
    cdef bytearray buf = bytearray(size)
    for b in enc:
        _put(buf, &pos, b)
    return u"2." + _blake2b(buf, digest_size=16, person=b"tracecode-body2").hexdigest()
