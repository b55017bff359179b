"""The settlement path's wire module (tracecode.codec.wire), over BOTH twins.

The compiled `_wire` and the pure-Python `wire_fallback` must give identical answers for every
input: each behaviour is asserted on both, then the twins are compared on generated inputs
(valid and damaged packed results, ARGV, digests). The oracles are the code the module
replaced: the store's results reading and ARGV packing and the verifier's digest, frozen here
where the store now calls the module itself.
"""
import os
import random
import typing

import pytest

from tracecode.rules.packing import code_field, hex128_field, id_field
from tracecode.codec import wire as wire_pkg
from tracecode.codec import wire_fallback
from tracecode.server.store import Store
from tracecode.server.store.layout import LINE_FIELDS, VERIFY_ARGV
from tracecode.server.store.types import ROW_FIELDS, PlanLine, ScriptRow, SettlementCall
from tracecode.server.verifier import Line, Verifier

NO_EXT = os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0")


def _compiled():
    try:
        from tracecode.codec import _wire
    except ImportError:
        if NO_EXT:
            pytest.skip("compiled wire module disabled by TRACECODE_NO_EXTENSIONS")
        pytest.fail("tracecode.codec._wire is not built (python setup.py build_ext --inplace)")
    return _wire


@pytest.fixture(params=["compiled", "python"])
def wire(request):
    return _compiled() if request.param == "compiled" else wire_fallback


def test_selected_implementation():
    assert wire_pkg.IMPLEMENTATION == ("python" if NO_EXT else "compiled")
    for name in ("decode_results", "encode_results", "verify_argv", "body_digest"):
        assert callable(getattr(wire_pkg, name))


def test_row_int_positions_are_the_stores():
    from tracecode.server.store.types import ROW_INT_POSITIONS
    assert wire_pkg.INT_FIELDS == ROW_INT_POSITIONS
    assert ROW_FIELDS[wire_pkg.OWN:wire_pkg.OWN + 3] == ("first_site_id", "first_settlement_id", "first_settled_at_ms")


def test_row_shape_is_script_rows():
    # The leaf module cannot import ScriptRow: its width and int positions must be ScriptRow's.
    hints = typing.get_type_hints(ScriptRow)
    assert wire_pkg.ROW_WIDTH == len(ROW_FIELDS) == 13
    assert wire_pkg.INT_FIELDS == tuple(i for i, f in enumerate(ROW_FIELDS) if hints[f] is int)


# --- results: the packed form -------------------------------------------------------------

DUP = ScriptRow("DUPLICATE", 0, 1, 1, "ACTIVE", "8123456", 20301231, "S00001", "sid-1", 1764600000123, 2, "", "")
OK = ScriptRow("OK", 1, 1, 1, "ACTIVE", "8123456", 20301231, "", "", 0, 0, "", "PH-RECEIVER")
BAD = ScriptRow("MALFORMED", 0, 0, 0, "", "", 0, "", "", 0, 0, "20 digits expected, got 7", "")


def plain(recorded, rows):
    """Every field written out (the packed form before its defaults): the decoder reads it too."""
    return ("1" if recorded else "0") + "".join("\x1e" + "\x1f".join(str(v) for v in r) for r in rows)


def packed(recorded, rows):
    """The packed form as layout.py documents it, written independently of the twins: an int 0
    as '', OK of an ACTIVE pack as '' in verdict and status, trailing empty fields left off."""
    out = "1" if recorded else "0"
    for r in rows:
        f = ["" if type(v) is int and v == 0 else str(v) for v in r]
        if r[0] == "OK" and r[4] == "ACTIVE":
            f[0] = f[4] = ""
        while f and f[-1] == "":
            f.pop()
        out += "\x1e" + "\x1f".join(f)
    return out


def test_decode_packed(wire):
    rec, rows = wire.decode_results(packed(True, [OK, DUP, BAD]), ScriptRow)
    assert rec is True and rows == [OK, DUP, BAD]
    assert all(type(r) is ScriptRow for r in rows)
    assert type(rows[1].first_settled_at_ms) is int and rows[1].first_settled_at_ms == 1764600000123


def test_decode_packed_zero_lines(wire):
    assert wire.decode_results("0", ScriptRow) == (False, [])
    assert wire.decode_results("1", ScriptRow) == (True, [])
    assert wire.decode_results("1", ScriptRow).recorded is True


def test_decode_packed_empty_strings_and_negatives(wire):
    row = ScriptRow("X", 0, -3, 0, "", "", 0, "", "", -1, 0, "", "")
    assert wire.decode_results(packed(False, [row]), ScriptRow).rows == [row]


def test_decode_packed_big_ints(wire):
    row = OK._replace(first_settled_at_ms=10**30, attempts=-(10**19))
    assert wire.decode_results(packed(True, [row]), ScriptRow).rows == [row]


def test_packed_defaults_are_written_as_nothing(wire):
    # The usual line of a record: OK, an ACTIVE pack, its own first dispense, no attempts.
    own = OK._replace(first_site_id="=", first_settlement_id="", first_settled_at_ms="", received_by="")
    assert wire.encode_results(True, [own._replace(first_settled_at_ms=0)]) == "1\x1e\x1f1\x1f1\x1f1\x1f\x1f8123456\x1f20301231\x1f="
    assert wire.decode_results("1\x1e", ScriptRow) == (True, [ScriptRow("OK", 0, 0, 0, "ACTIVE", "", 0, "", "", 0, 0, "",
                                                                         "")])
    # OK of a pack of another status, and a verdict with status '', stay as they are.
    odd = OK._replace(status="")
    assert wire.decode_results(wire.encode_results(False, [odd]), ScriptRow).rows == [odd]
    assert wire.decode_results(plain(True, [OK, DUP, BAD]), ScriptRow) == (True, [OK, DUP, BAD])


def test_encode_refuses_an_empty_verdict(wire):
    with pytest.raises(ValueError):
        wire.encode_results(True, [OK._replace(verdict="")])


@pytest.mark.parametrize("text", [
    "", "2", "01", "x", "1\x1e" + "\x1f".join(["OK"] * 14), "1\x1e\x1f0\x1f0\x1f0\x1fLOCKED",
    packed(True, [OK]).replace("\x1f1\x1f", "\x1f+1\x1f", 1),
    packed(True, [OK]).replace("\x1f1\x1f", "\x1f 1\x1f", 1),
    packed(True, [OK]).replace("\x1f1\x1f", "\x1f1_0\x1f", 1),
    packed(True, [OK]).replace("\x1f1\x1f", "\x1f\u0661\x1f", 1),  # ARABIC-INDIC DIGIT ONE: int() takes it
    packed(True, [OK]).replace("\x1f1\x1f", "\x1f-\x1f", 1),
    packed(True, [OK]).replace("\x1f1\x1f", "\x1f1 \x1f", 1),
])
def test_decode_packed_refuses_damage(wire, text):
    with pytest.raises(ValueError):
        wire.decode_results(text, ScriptRow)


def _stored_oracle(text, site, sid, at_ms):
    """The stored-results reading as the store first wrote it (store.decode_stored before the
    wire module), frozen, with the defaults of layout 4: a row's own first dispense is '=', '',
    ''; its trailing fields may be left off; an int '' is 0; a verdict '' is OK of an ACTIVE pack."""
    parts = text.split("\x1e")
    rows = []
    for part in parts[1:]:
        f = part.split("\x1f")
        f += [""] * (13 - len(f))
        if f[0] == "":
            f[0], f[4] = "OK", "ACTIVE"
        if f[7] == "=":
            f[7:10] = site, sid, at_ms
        for i in (1, 2, 3, 6, 9, 10):
            f[i] = int(f[i]) if f[i] != "" else 0
        rows.append(ScriptRow(*f))
    return parts[0] == "1", rows


def test_decode_stored_own_first_dispense(wire):
    own = OK._replace(first_site_id="=", first_settlement_id="", first_settled_at_ms="")
    text = packed(True, [own, DUP])
    got = wire.decode_results(text, ScriptRow, ("S00009", "sid-9", 1764600000999))
    assert got == (True, [OK._replace(first_site_id="S00009", first_settlement_id="sid-9",
                                      first_settled_at_ms=1764600000999), DUP])
    assert got == _stored_oracle(text, "S00009", "sid-9", 1764600000999)
    with pytest.raises(ValueError):  # without `own` the shorthand is not a row (its time is '')
        wire.decode_results(text, ScriptRow)


def test_stored_results_twins_and_store_agree():
    from tracecode.server.store.types import decode_stored
    compiled = _compiled()
    rnd = random.Random(5)
    for _ in range(1000):
        rows = [_random_row(rnd) for _ in range(rnd.randrange(0, 5))]
        rows = [r._replace(first_site_id="=", first_settlement_id="", first_settled_at_ms="") if rnd.random() < 0.4 else r
                for r in rows]
        text = packed(rnd.random() < 0.5, rows)
        own = (f"S{rnd.randrange(99999):05d}", f"sid-{rnd.randrange(10**6)}", rnd.randrange(10**13))
        want = _stored_oracle(text, *own)
        assert compiled.decode_results(text, ScriptRow, own) == wire_fallback.decode_results(text, ScriptRow, own) == want
        assert decode_stored(text, *own) == want


def _random_row(rnd):
    def s():
        return "".join(rnd.choice("abcXYZ019._-éß漢 ") for _ in range(rnd.randrange(0, 12)))

    def i():
        return rnd.choice([0, 1, -1, rnd.randrange(10**13), rnd.randrange(-10**6, 10**6), 10**19 + rnd.randrange(10)])
    # Verdicts are never '' (encode_results refuses one); OK and ACTIVE are the packed defaults.
    return ScriptRow(rnd.choice(["OK", "DUPLICATE", s() or "X"]), i(), i(), i(), rnd.choice(["ACTIVE", "", s()]), s(), i(),
                     s(), s(), i(), i(), s(), s())


def test_encode_decode_round_trip(wire):
    rnd = random.Random(19)
    for _ in range(500):
        rows = [_random_row(rnd) for _ in range(rnd.randrange(0, 7))]
        rec = rnd.random() < 0.5
        text = wire.encode_results(rec, rows)
        assert text == packed(rec, rows)
        assert wire.decode_results(text, ScriptRow) == (rec, rows)


@pytest.mark.parametrize("row, error", [
    (OK._replace(reason="a\x1fb"), ValueError), (OK._replace(verdict="O\x1eK"), ValueError),
    (OK._replace(accepted=True), TypeError), (OK._replace(accepted="1"), TypeError),
    (OK._replace(status=None), TypeError), (tuple(OK)[:11], ValueError),
])
def test_encode_refuses_what_would_not_decode_back(wire, row, error):
    with pytest.raises(error):
        wire.encode_results(True, [row])


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the twins must fail alike too
        return ("error", type(exc))


def test_twins_agree_on_generated_results():
    compiled = _compiled()
    rnd = random.Random(1919)
    alphabet = ["0", "1", "-", "9", "a", "\x1e", "\x1f", "OK", " ", "+", "é"]
    for n in range(3000):
        rows = [_random_row(rnd) for _ in range(rnd.randrange(0, 5))]
        text = packed(rnd.random() < 0.5, rows)
        if n % 2:  # damage it: a character replaced, inserted or dropped
            k = rnd.randrange(len(text) + 1)
            op = rnd.randrange(3)
            c = rnd.choice(alphabet)
            text = text[:k] + c + text[k + 1:] if op == 0 else text[:k] + c + text[k:] if op == 1 else text[:k] + text[k + 1:]
        a = _outcome(compiled.decode_results, text, ScriptRow)
        b = _outcome(wire_fallback.decode_results, text, ScriptRow)
        assert a == b, repr(text)


# --- verify.lua ARGV -----------------------------------------------------------------------------

def _today_args(store, call, mode, lines, idx, codes):
    """ARGV as Store.verify_keys_args built it before the wire module, frozen: the oracle."""
    state = call.state
    lim = store.limits
    state_ttl = lim.reservation_ms if mode == "P" else call.state_ttl_s
    fixed = {"mode": mode, "site": call.site, "settlement_id": call.settlement_id,
             "settled_at_ms": call.settled_at_ms, "settle_day": call.settle_day,
             "digest": hex128_field(call.digest),
             "policy": "A" if call.all_or_nothing else "R", "audit_max": 0 if state else lim.audit_max,
             "history_max": lim.history_max, "settlement_ttl_s": call.state_ttl_s or lim.settlement_ttl_s,
             "n_lines": len(lines), "state_ttl": state_ttl, "buyer": hex128_field(call.insured),
             "site_packed": id_field(call.site), "settlement_packed": id_field(call.settlement_id)}
    args = [fixed[f] for f in VERIFY_ARGV]
    for line, i in zip(lines, idx):
        args.extend(line)
        args.append(i)
    args.extend(codes)
    args.extend(code_field(c) for c in codes)
    gate = call.gate if not store.cluster and not state else ""
    n_gate = (1 + bool(call.insured)) if gate else 0
    # The live rules' configuration (lua/gate.lua): live dispenses only.
    live = call.live if mode in ("D", "P") and not state else ""
    return args + [call.insured, gate, n_gate, live]


def _random_call(rnd, n_lines):
    codes, lines = [], []
    for _ in range(n_lines):
        if rnd.random() < 0.15:
            lines.append(PlanLine(0, f"P{rnd.randrange(99)}", rnd.randrange(3), "bad scan"))
        else:
            code = f"8123456{rnd.randrange(10**13):013d}"
            if code not in codes:
                codes.append(code)
            lines.append(PlanLine(codes.index(code) + 1, "8123456", rnd.randrange(4), ""))
    return SettlementCall(dispense=rnd.random() < 0.8, site=f"S{rnd.randrange(999):05d}", settlement_id=f"sid-{rnd.randrange(10**6)}",
                          settled_at_ms=1764600000000 + rnd.randrange(10**6), settle_day=20261201,
                          digest="2." + "%032x" % rnd.getrandbits(128), all_or_nothing=rnd.random() < 0.3,
                          lines=lines, codes=codes, insured=rnd.choice(["", "ps-abc"]), gate=rnd.choice(["", "E", "N"]),
                          live=rnd.choice(["", "J|N|6|3|2592000000|1|N|2|7776000000|1|tc|256"]))


def test_verify_argv_is_todays_argv(wire):
    # No Redis needed: packing arguments talks to nobody.
    store = Store.from_url("redis://127.0.0.1:1")
    rnd = random.Random(7)
    for _ in range(400):
        call = _random_call(rnd, rnd.randrange(0, 21))
        mode = rnd.choice("DCP")
        idx = list(range(len(call.lines)))
        want = _today_args(store, call, mode, call.lines, idx, call.codes)
        # The store's own packing (whatever it calls) ...
        record = store.keys.settlement(call.site, call.settlement_id)
        _, got = store.verify_keys_args(call, mode, record, list(call.lines), idx, list(call.codes))
        assert got == want
        assert [type(v) for v in got] == [type(v) for v in want]
        # ... and the module's, from the fixed values and the gate's tail.
        fixed, tail = want[:len(VERIFY_ARGV)], want[-4:]
        codes = [*call.codes, *map(code_field, call.codes)]  # the codes, then their packed field names
        assert wire.verify_argv(fixed, call.lines, idx, codes, tail) == want
        assert len(want) == len(VERIFY_ARGV) + len(call.lines) * len(LINE_FIELDS) + 2 * len(call.codes) + 4


def test_verify_argv_takes_any_sequences(wire):
    assert wire.verify_argv(("D", "s"), iter([(1, "p", 0, "")]), (5,), iter(["c"]), ["", "", 0]) == \
        ["D", "s", 1, "p", 0, "", 5, "c", "", "", 0]
    # zip(): the shorter of lines and their indexes
    assert wire.verify_argv((), [(1,), (2,)], [0], (), ()) == [1, 0]
    assert wire.verify_argv((), [], [], (), ()) == []


# --- the body digest -----------------------------------------------------------------------------

_TEXT = ["", "a", "8123456" + "0" * 13, "]d2010690123456789221SN1\x1d10B1", "é", "漢字", "\U0001F48A",
         "\ud800", "x\x1ey\x1fz", "a" * 300]


def test_body_digest_is_the_verifiers(wire):
    rnd = random.Random(42)
    for _ in range(2000):
        lines = [Line(rnd.choice(_TEXT) + rnd.choice(_TEXT), rnd.choice(_TEXT), rnd.choice([0, 1, 7, 100_000, -1]))
                 for _ in range(rnd.randrange(0, 8))]
        args = (rnd.choice(_TEXT), rnd.choice(_TEXT), rnd.choice([0, 1764600000123, 4102444799999, -5]),
                rnd.random() < 0.5, lines)
        assert wire.body_digest(*args) == Verifier.digest(*args) == _today_digest(*args)


def _today_digest(site_id, settlement_id, at_ms, all_or_nothing, lines):
    """Verifier.digest before the wire module, frozen: the oracle of stored settlements' digests."""
    import hashlib
    h = hashlib.blake2b(digest_size=16, person=b"tracecode-body2")
    fields = [site_id, settlement_id, str(at_ms), "A" if all_or_nothing else "R", str(len(lines))]
    for ln in lines:
        fields += (ln.raw_code, ln.product_id, str(ln.units))
    for f in fields:
        b = f.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    return "2." + h.hexdigest()


def test_body_digest_known_value(wire):
    # A fixed body's digest, as stored settlements carry it (any change breaks their replays).
    d = wire.body_digest("S00001", "sid-1", 1764600000123, False, [Line("81234567890123456789", "8123456", 0)])
    assert d == "2.2853f7ece8cda42b7f3dda69d3b845a4"
    assert d.startswith("2.") and len(d) == 34
