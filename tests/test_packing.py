"""The packed forms of the national layout (rules/packing.py) and their Lua twins in
server/store/lua/_state.lua: both directions agree over random and edge values, run inside a real
redis-server, and every packed form is printable, separator-free and decodes back to its value."""
from __future__ import annotations

import json
import random
import string

import pytest

from tracecode.rules import packing
from tracecode.rules.pseudonym import Pseudonymizer
from tracecode.rules.schema import RS, US
from tracecode.server.store.store import script_text

pytestmark = pytest.mark.backend_independent

# The functions of _state.lua, each over a list of inputs, answered as json.
_PROBE = script_text("read.lua").split("local e = redis.call")[0] + """
local out = {}
for i = 2, #ARGV do
  local v = ARGV[i]
  local f = ARGV[1]
  if f == 'cfield' then out[#out + 1] = cfield(v)
  elseif f == 'msf' then out[#out + 1] = msf(tonumber(v))
  elseif f == 'ms_of' then out[#out + 1] = istr(ms_of(v))
  elseif f == 'h128f' then out[#out + 1] = h128f(v)
  elseif f == 'h128_of' then out[#out + 1] = h128_of(v)
  elseif f == 'idf' then out[#out + 1] = idf(v)
  elseif f == 'id_of' then out[#out + 1] = id_of(v) end
end
return cjson.encode(out)
"""


def _codes(rng: random.Random, n: int) -> list[str]:
    out = ["0" * 20, "9" * 20, "81234562450181722640", "01" + "0" * 14 + "21" + "1", "01" + "9" * 14 + "21" + "Z" * 20,
           "0106901234567908" + "21" + "SN0000077731", "HX-UNKNOWN-FORM", "0123", "01069012345679082",
           "01069012345679x821ABC", "1234567890123456789", "123456789012345678901",
           "01" + "\u0663" * 14 + "21SN1", "\uff18" * 20, "8123456245018172264\u0660"]  # other scripts' digits
    serial_chars = string.ascii_letters + string.digits + "!%&'()*+,-./:;<=>?_\""
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            out.append("".join(rng.choice(string.digits) for _ in range(20)))
        elif kind < 0.9:
            out.append("01" + "".join(rng.choice(string.digits) for _ in range(14)) + "21"
                       + "".join(rng.choice(serial_chars) for _ in range(rng.randint(1, 20))))
        else:
            out.append("".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(rng.randint(1, 40))))
    return out


def _lua(redis_server, fn: str, values: list[str]) -> list[str]:
    import redis
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return json.loads(r.eval(_PROBE, 0, fn, *values))
    finally:
        r.close()


def _clean(text: str) -> bool:
    return all(c.isprintable() and c.isascii() and c not in (US, RS, " ") for c in text)


def test_codes_pack_the_same_in_python_and_lua_and_come_back(redis_server):
    codes = _codes(random.Random(29), 3000)
    fields = [packing.code_field(c) for c in codes]
    assert _lua(redis_server, "cfield", codes) == fields
    assert [packing.code_of(f) for f in fields] == codes
    assert len(set(fields)) == len(set(codes))  # no two codes share a field
    for code, field in zip(codes, fields):
        if len(code) == 20 and code.isascii() and code.isdigit():
            assert len(field) == 12 and _clean(field)
        elif code.startswith("01") and len(code) > 18 and code[2:16].isascii() and code[2:16].isdigit() \
                and code[16:18] == "21":
            assert field.startswith("~") and len(field) == 9 + len(code) - 18


def test_times_and_pseudonyms_pack_the_same_in_python_and_lua(redis_server):
    rng = random.Random(7)
    times = [1, 63, 64, 2**36 - 1, 2**36, 1_765_000_000_000, 2**42 - 1] + [rng.randrange(1, 2**42) for _ in range(500)]
    packed = [packing.ms_field(t) for t in times]
    assert all(len(p) == packing.MS_CHARS and _clean(p) for p in packed)
    assert _lua(redis_server, "msf", [str(t) for t in times]) == packed
    assert [int(x) for x in _lua(redis_server, "ms_of", packed)] == times == [packing.ms_of(p) for p in packed]
    ps = Pseudonymizer(b"k" * 32)
    pseudonyms = [ps.pseudonym(f"11010519491231{n:03d}X") for n in range(300)] + ["k1." + "0" * 32, "k1." + "f" * 32]
    packed = [packing.hex128_field(p) for p in pseudonyms]
    assert all(len(p) == len(q) - 10 and _clean(p) for p, q in zip(packed, pseudonyms))
    assert _lua(redis_server, "h128f", pseudonyms) == packed
    assert _lua(redis_server, "h128_of", packed) == pseudonyms == [packing.hex128_of(p) for p in packed]
    # What is not a pseudonym of this shape passes through both ways unchanged.
    odd = ["", "k1.XYZ", "plain", "k1." + "A" * 32]
    assert [packing.hex128_field(p) for p in odd] == odd
    assert _lua(redis_server, "h128f", [p for p in odd if p]) == [p for p in odd if p]


def test_site_and_settlement_ids_pack_the_same_in_python_and_lua(redis_server):
    """Ids of rules/rows.py's alphabet: a tail of 10-19 digits not starting with 0 is packed,
    anything else kept; both ways agree and come back."""
    rng = random.Random(11)
    alphabet = string.ascii_letters + string.digits + "._-"
    ids = ["JS202612070000000000", "P11010500123", "S00463", "1234567890", "0123456789", "x" + "9" * 25,
           "A1-0000000000123", "9" * 19, "9" * 20, "1" + "0" * 9, "B." + "1" * 10, "ZZ" + "0" * 12 + "5"]
    for _ in range(1500):
        head = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        tail = "".join(rng.choice(string.digits) for _ in range(rng.randint(0, 24)))
        ids.append((head + tail) or "X")
    packed = [packing.id_field(i) for i in ids]
    assert _lua(redis_server, "idf", ids) == packed
    assert _lua(redis_server, "id_of", packed) == ids == [packing.id_of(p) for p in packed]
    assert packing.id_field("JS202612070000000000") == "JS" + packing.id_field("202612070000000000")
    assert len(packing.id_field("JS202612070000000000")) == 13 and len(packing.id_field("P11010500123")) == 9
    assert all(len(p) <= len(i) for i, p in zip(ids, packed))
    # An id outside that alphabet that happens to hold a marker is left as it is both ways.
    odd = ["a(bcdefgh", "x!", "!"]
    assert [packing.id_of(o) for o in odd] == odd == _lua(redis_server, "id_of", odd)


def test_a_code_field_that_is_not_packed_is_refused():
    with pytest.raises(ValueError):
        packing.code_of("81234562450181722640")
