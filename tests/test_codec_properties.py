"""Property tests of the scan-code codec (hypothesis), over both twins.

1. A valid pack rendered in EVERY transport form maps to one key and the same fields.
2. Arbitrary text never makes the codec raise; a rejection always carries a reason.
3. The compiled and pure-Python twins return identical tuples on arbitrary input.
"""
import datetime
import os
import urllib.parse

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tracecode.codec import KEY, KIND_CN20, KIND_GS1, KIND_MALFORMED, Profile, fallback
from tracecode.codec.tables import CHARSET82

GS = "\x1d"
REF = datetime.date(2026, 6, 15)
SETTINGS = settings(
    max_examples=300,
    derandomize=True,  # deterministic in CI
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _compiled():
    try:
        from tracecode.codec import _codec
    except ImportError:
        if os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip("compiled codec disabled by TRACECODE_NO_EXTENSIONS")
        pytest.fail("tracecode.codec._codec is not built")
    return _codec


@pytest.fixture(scope="module", params=["compiled", "python"])  # stateless: safe to share
def codec(request):
    return _compiled() if request.param == "compiled" else fallback


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def gtins(draw):
    """A valid GTIN-14, biased towards GTIN-13/12/8 with leading zeros (they compress in a DL)."""
    width = draw(st.sampled_from([8, 12, 13, 14]))
    body = draw(st.text("0123456789", min_size=width - 1, max_size=width - 1))
    body = body.rjust(13, "0")
    return body + str(fallback.gtin_check_digit(body))


set82 = st.text(CHARSET82, min_size=1, max_size=20)


@st.composite
def yymmdd(draw):
    year = draw(st.integers(1977, 2076))  # inside the window around REF.year
    month = draw(st.integers(1, 12))
    last = (datetime.date(year + month // 12, month % 12 + 1, 1) - datetime.timedelta(days=1)).day
    day = draw(st.integers(0, last))
    expiry = year * 10000 + month * 100 + (day or last)
    return f"{year % 100:02d}{month:02d}{day:02d}", expiry


@st.composite
def packs(draw):
    return {
        "gtin": draw(gtins()),
        "serial": draw(set82),
        "batch": draw(st.none() | set82),
        "expiry": draw(st.none() | yymmdd()),
    }


def _elements(pack):
    """(AI, value, needs-separator) in a shuffled-but-valid order: GTIN first, as packs print it."""
    out = [("01", pack["gtin"], False)]
    if pack["expiry"]:
        out.append(("17", pack["expiry"][0], False))
    if pack["batch"] is not None:
        out.append(("10", pack["batch"], True))
    out.append(("21", pack["serial"], True))
    return out


def raw_form(pack, aim, sep, leading_gs):
    parts = []
    elements = _elements(pack)
    for i, (ai, value, variable) in enumerate(elements):
        parts.append(ai + value)
        if variable and i < len(elements) - 1:
            parts.append(sep)
    return aim + (sep if leading_gs else "") + "".join(parts)


def hri_form(pack):
    return "".join(f"({ai}){value}" for ai, value, _ in _elements(pack))


def dl_form(pack, host, prefix, quote_all):
    g = pack["gtin"]
    short = g
    for width in (8, 12, 13):  # the shortest GTIN the zeros allow
        if g[: 14 - width] == "0" * (14 - width):
            short = g[14 - width :]
            break
    safe = "" if quote_all else "-._~!*'()+,:;"

    def q(v):
        return urllib.parse.quote(v, safe=safe)

    path = f"{prefix}/01/{short}"
    if pack["batch"] is not None:
        path += f"/10/{q(pack['batch'])}"
    path += f"/21/{q(pack['serial'])}"
    query = f"?17={pack['expiry'][0]}&linkType=all" if pack["expiry"] else ""
    return f"https://{host}{path}{query}"


def fullwidth(s):
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def expected(pack):
    g, serial = pack["gtin"], pack["serial"]
    return (
        KIND_GS1,
        "01" + g + "21" + serial,
        g,
        serial,
        pack["batch"] or "",
        pack["expiry"][1] if pack["expiry"] else 0,
        "",
    )


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,12}(\.[a-z]{2,6}){1,2}(:[0-9]{2,5})?", fullmatch=True)
prefixes = st.sampled_from(["", "/p", "/a/b/c", "/gs1"])


# --- 1. every transport form -> one key ----------------------------------------------------------


@SETTINGS
@given(pack=packs(), host=hosts, prefix=prefixes, sub=st.sampled_from(["|", "^", "~", "<GS>"]))
def test_every_transport_form_gives_one_key(codec, pack, host, prefix, sub):
    hri = hri_form(pack)
    # A value containing "(NN)" would read as an AI group in the human-readable form.
    hri_ok = "(" not in pack["serial"] + (pack["batch"] or "")
    p = Profile(ref_date=REF)
    ps = Profile(gs_substitutes=(sub,), ref_date=REF)
    want = expected(pack)
    forms = [(raw_form(pack, aim, GS, lead), p) for aim in ("]d2", "]Q3", "]C1", "]e0")
             for lead in (False, True)]  # fmt: skip
    forms += [
        (raw_form(pack, "", GS, False), p),
        (" " + raw_form(pack, "]d2", GS, False) + "\r\n", p),
        (raw_form(pack, "", sub, False), ps),
        (raw_form(pack, "]d2", sub, True), ps),
        (dl_form(pack, host, prefix, False), p),
        (dl_form(pack, host, prefix, True), p),
        ("]Q1" + dl_form(pack, host, prefix, False), p),
        ("]d1" + dl_form(pack, host.upper(), prefix, True), p),
        (fullwidth(raw_form(pack, "]d2", GS, False)), p),
    ]
    if hri_ok:
        forms += [(hri, p), (fullwidth(hri), p)]
    for raw, profile in forms:
        # "<GS>" etc. are set-82 text: a value containing the substitute would split; skip it.
        if profile is ps and sub in pack["serial"] + (pack["batch"] or ""):
            continue
        assert codec.parse(raw, profile) == want, raw


@SETTINGS
@given(digits=st.text("0123456789", min_size=19, max_size=19), host=hosts)
def test_cn20_every_form_gives_one_key(codec, digits, host):
    code = "8" + digits
    want = (KIND_CN20, code, code[:7], code[7:16], "", 0, "")
    forms = [
        code, f" {code}\r\n", f"\t{code}\n", "]C0" + code, "]d1" + code, "]Q1" + code,
        fullwidth(code), f"https://{host}/v/{code}", f"http://{host}/q?id={code}&x=1",
        f"]Q1https://{host}/{code}", "\u3000" + fullwidth(code) + "\u3000",
    ]  # fmt: skip
    for raw in forms:
        assert codec.parse(raw) == want, raw


# --- 2. never raises; every rejection has a reason ----------------------------------------------

ATOMS = st.sampled_from(
    ["0", "1", "2", "7", "8", "01", "10", "17", "21", "(", ")", "(01)", "(21)", GS, "|", "<GS>",
     "]d2", "]Q1", "]C0", "]", "https://", "http://", "/01/", "/21/", "?17=", "&", "=", "%", "%4",
     "%41", "#", " ", "\r\n", "A", "z", "é", "\u3000", "８", "（", "\x00", "\ud800", "/"]
)  # fmt: skip
structured = st.lists(ATOMS | st.text(max_size=3), max_size=40).map("".join)
any_text = st.text(max_size=200) | st.binary(max_size=200).map(
    lambda b: b.decode("utf-8", "replace")
) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")) | structured


def _check_shape(r):
    assert type(r) is tuple and len(r) == 7
    kind, key, product, serial, batch, expiry, reason = r
    if kind == KIND_MALFORMED:
        assert reason and (key, product, serial, batch, expiry) == ("", "", "", "", 0)
    else:
        assert reason == "" and key and product and serial
        if kind == KIND_CN20:
            assert len(key) == 20 and key.isdigit()
        else:
            assert key == "01" + product + "21" + serial and len(product) == 14


@SETTINGS
@given(raw=any_text)
def test_never_raises_and_rejections_have_reasons(codec, raw):
    _check_shape(codec.parse(raw))
    _check_shape(codec.parse(raw, Profile(gs_substitutes=("|", "<GS>"), cn_prefixes="")))


# --- 3. twins identical ---------------------------------------------------------------------------

profiles = st.builds(
    Profile,
    gs_substitutes=st.sampled_from([(), ("|",), ("<GS>",), ("~", "^")]),
    cn_prefixes=st.sampled_from(["8", "", "089", "0"]),
    ref_date=st.sampled_from([None, REF, datetime.date(1990, 1, 1), datetime.date(2070, 12, 31)]),
    max_length=st.sampled_from([512, 64]),
)


@SETTINGS
@given(raws=st.lists(any_text, max_size=20), profile=profiles)
def test_twins_identical_on_random_input(raws, profile):
    compiled = _compiled()
    assert compiled.parse_many(raws, profile) == fallback.parse_many(raws, profile)


@SETTINGS
@given(raws=st.lists(any_text, max_size=20), profile=profiles, packs_=st.lists(packs(), max_size=5))
def test_keys_many_is_the_key_column_of_parse_many(raws, profile, packs_):
    """keys_many (the leads engine's column path) returns exactly parse_many's keys, both twins,
    on random text and on valid scans (which take the key-only path of the compiled codec)."""
    compiled = _compiled()
    raws = raws + [raw_form(p, "]d2", GS, False) for p in packs_] + [hri_form(p) for p in packs_]
    want = [p[KEY] for p in compiled.parse_many(raws, profile)]
    assert compiled.keys_many(raws, profile) == want == fallback.keys_many(raws, profile)


@SETTINGS
@given(pack=packs(), data=st.data())
def test_twins_identical_on_mutated_valid_scans(pack, data):
    compiled = _compiled()
    raw = data.draw(st.sampled_from([raw_form(pack, "]d2", GS, False), hri_form(pack),
                                     dl_form(pack, "x.y", "", False)]))  # fmt: skip
    i = data.draw(st.integers(0, len(raw)))
    j = data.draw(st.integers(i, min(len(raw), i + 3)))
    mutated = raw[:i] + data.draw(ATOMS) + raw[j:]
    assume(mutated)
    p = Profile(ref_date=REF)
    assert compiled.parse(mutated, p) == fallback.parse(mutated, p)
