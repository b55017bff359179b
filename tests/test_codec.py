"""Scan-code codec: every rule of shared/spec/codes.md (and docs/codes.md), over BOTH twins.

The compiled `_codec` and the pure-Python `fallback` must give identical tuples for every input;
each rule is asserted on both, then the twins are compared on a large generated corpus.
"""
import datetime
import os
import random
import subprocess
import sys

import pytest

import tracecode.codec as codec_pkg
from tracecode.codec import KIND_CN20, KIND_GS1, KIND_MALFORMED, Profile
from tracecode.codec import fallback

GS = "\x1d"
REF = datetime.date(2026, 6, 15)
P = Profile(ref_date=REF)  # fixed reference year: results do not depend on the day CI runs


def _compiled():
    try:
        from tracecode.codec import _codec
    except ImportError:
        if os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip("compiled codec disabled by TRACECODE_NO_EXTENSIONS")
        pytest.fail("tracecode.codec._codec is not built (python setup.py build_ext --inplace)")
    return _codec


@pytest.fixture(params=["compiled", "python"])
def codec(request):
    return _compiled() if request.param == "compiled" else fallback


def gtin(body):
    """A valid GTIN: body + GS1 check digit."""
    return body + str(fallback.gtin_check_digit(body))


G = gtin("0690123456789")  # GTIN-14 with leading 0 (a GTIN-13 on the pack)
G8 = gtin("000000" + "1234567")  # a GTIN-8 carried as GTIN-14
CN = "81234567890123456789"


def ok(kind, key, product, serial, batch="", expiry=0):
    return (kind, key, product, serial, batch, expiry, "")


def bad(reason):
    return (KIND_MALFORMED, "", "", "", "", 0, reason)


def gs1(serial, batch="", expiry=0, g=G):
    return ok(KIND_GS1, "01" + g + "21" + serial, g, serial, batch, expiry)


CN_OK = ok(KIND_CN20, CN, "8123456", "789012345")


# --- API shape ----------------------------------------------------------------------------------


def test_package_exports():
    # The one this run asked for: the compiled extension unless TRACECODE_NO_EXTENSIONS is set.
    expected = "python" if os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0") else "compiled"
    assert codec_pkg.IMPLEMENTATION == expected
    assert (KIND_MALFORMED, KIND_CN20, KIND_GS1) == (0, 1, 2)
    for name in ("parse", "parse_many", "Profile", "gtin_check_digit", "IMPLEMENTATION"):
        assert hasattr(codec_pkg, name)


def test_default_implementation_is_compiled():
    if os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("extensions disabled")
    assert codec_pkg.IMPLEMENTATION == "compiled"


def test_env_var_selects_fallback():
    code = "import tracecode.codec as c; print(c.IMPLEMENTATION, c.parse.__module__)"
    env = dict(os.environ, TRACECODE_NO_EXTENSIONS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["python", "tracecode.codec.fallback"], out.stderr


def test_missing_extension_warns_loudly():
    # Hide the compiled module from the import system and check the package says so on stderr.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tracecode.codec._codec': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import logging; logging.basicConfig()\n"
        "import tracecode.codec as c; print(c.IMPLEMENTATION)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRACECODE_NO_EXTENSIONS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "python"
    assert "WARNING:tracecode.codec" in out.stderr and "fallback" in out.stderr


def test_result_is_a_tuple_of_seven(codec):
    r = codec.parse(CN, P)
    assert type(r) is tuple and len(r) == 7
    assert [type(x) for x in r] == [int, str, str, str, str, int, str]


@pytest.mark.parametrize("value", [None, b"8123", 81234567890123456789, ["x"]])
def test_non_str_raises_type_error(codec, value):
    with pytest.raises(TypeError):
        codec.parse(value)


def test_bad_profile_raises_type_error(codec):
    with pytest.raises(TypeError):
        codec.parse(CN, {"cn_prefixes": "8"})
    with pytest.raises(TypeError):
        codec.parse_many([CN], "8")


def test_str_subclass_is_accepted(codec):
    class S(str):
        pass

    assert codec.parse(S(CN), P) == CN_OK


def test_parse_many_matches_parse(codec):
    scans = [CN, "]d201" + G + "21A", "x", "", "(01)" + G + "(21)B"]
    want = [codec.parse(s, P) for s in scans]
    assert codec.parse_many(scans, P) == want
    assert codec.parse_many(tuple(scans), P) == want
    assert codec.parse_many(iter(scans), P) == want
    assert codec.parse_many([], P) == []


def test_parse_many_rejects_non_str_item(codec):
    with pytest.raises(TypeError):
        codec.parse_many([CN, 5], P)


def test_gtin_check_digit(codec):
    assert codec.gtin_check_digit("0690123456789") == int(G[-1])
    assert codec.gtin_check_digit("629104150021") == 3  # GTIN-13 6291041500213
    assert codec.gtin_check_digit("9506000134352") == fallback.gtin_check_digit("9506000134352")
    with pytest.raises(ValueError):
        codec.gtin_check_digit("12a")
    with pytest.raises(ValueError):
        codec.gtin_check_digit("")
    with pytest.raises(TypeError):
        codec.gtin_check_digit(123)


def test_default_profile_is_used_when_none(codec):
    assert codec.parse(CN) == CN_OK
    assert codec.parse(CN, None) == CN_OK


# --- profile ------------------------------------------------------------------------------------


def test_profile_is_immutable_and_hashable():
    a = Profile(gs_substitutes=("|",), cn_prefixes="98", ref_date=REF)
    b = Profile(gs_substitutes=["|"], cn_prefixes="89", ref_date=REF)
    assert a == b and hash(a) == hash(b)
    assert a.cn_prefixes == "89"
    assert a.separators == (GS, "|")
    with pytest.raises(AttributeError):
        a.cn_prefixes = "1"
    assert Profile().gs_substitutes == () and Profile().cn_prefixes == "8"
    assert Profile().max_length == 512 and Profile().ref_date is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gs_substitutes": "|"},  # a bare string, not a tuple
        {"gs_substitutes": ("",)},
        {"gs_substitutes": ("1",)},
        {"gs_substitutes": ("é",)},
        {"cn_prefixes": "8a"},
        {"cn_prefixes": 8},
        {"max_length": 0},
        {"max_length": "512"},
        {"ref_date": "2026-01-01"},
    ],
)
def test_profile_rejects_bad_config(kwargs):
    with pytest.raises((TypeError, ValueError)):
        Profile(**kwargs)


def test_profile_datetime_ref_date_is_reduced_to_date():
    p = Profile(ref_date=datetime.datetime(2026, 1, 2, 3, 4))
    assert p.ref_date == datetime.date(2026, 1, 2)


# --- common front end ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, want",
    [
        ("", bad("empty scan")),
        (" \t\r\n", bad("empty scan")),
        ("\u3000\u00a0\ufeff", bad("empty scan")),
        ("é" + CN, bad("scan: character U+00E9 at position 1 is not ASCII")),
        (CN[:5] + "\u4e2d" + CN[5:], bad("scan: character U+4E2D at position 6 is not ASCII")),
        (" \u3000" + CN + "\u3000", CN_OK),  # ideographic spaces stripped after normalising
        ("]", bad("incomplete symbology identifier")),
        ("]d", bad("incomplete symbology identifier")),
        ("]E0" + CN, bad("unsupported symbology identifier ]E0")),
        ("]D2" + CN, bad("unsupported symbology identifier ]D2")),
        ("]\x01\x02" + CN, bad("unsupported symbology identifier at position 1")),
        ("]d2", bad("empty scan after symbology identifier ]d2")),
        ("]C0 ", bad("empty scan after symbology identifier ]C0")),  # stripped first
    ],
)
def test_front_end(codec, raw, want):
    assert codec.parse(raw, P) == want


def test_max_length(codec):
    p = Profile(max_length=30, ref_date=REF)
    assert codec.parse(CN + " " * 10, p) == CN_OK
    assert codec.parse(CN + " " * 11, p) == bad("scan: 31 characters exceeds maximum 30")
    assert codec.parse("x" * 100_000) == bad("scan: 100000 characters exceeds maximum 512")
    big = Profile(max_length=5000)
    assert codec.parse("8" * 4000, big) == bad("20-digit code: 4000 digits")
    assert codec.parse("é" * 4000, big)[6] == "scan: character U+00E9 at position 1 is not ASCII"


# --- 20-digit Chinese code ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        CN,
        " " + CN + "\r\n",
        "\t" + CN + "\n",
        CN + "\r",
        "]C0" + CN,
        "]d1" + CN,
        "]Q1" + CN,
        " ]C0" + CN + "\r\n",
        "".join(chr(ord(c) + 0xFEE0) for c in CN),  # full-width digits
        "８１２３４５６７８９" + CN[10:],  # mixed full-width / ASCII
        "］Ｃ０" + CN,  # full-width symbology identifier too
    ],
)
def test_cn20_forms(codec, raw):
    assert codec.parse(raw, P) == CN_OK


@pytest.mark.parametrize(
    "raw, reason",
    [
        (CN[:-1], "20-digit code: 19 digits"),
        (CN + "0", "20-digit code: 21 digits"),
        ("8", "20-digit code: 1 digits"),
        (CN[:10] + "O" + CN[11:], "20-digit code: character 'O' at position 11 is not a digit"),
        (CN[:10] + " " + CN[10:], "20-digit code: character ' ' at position 11 is not a digit"),
        ("5" + CN[1:], "20-digit code: leading digit 5 not admitted (admitted: 8)"),
        ("02" + CN[2:], "20-digit code: leading digit 0 not admitted (admitted: 8)"),
        ("0" + CN[1:], "GTIN check digit: expected 4, got 5"),  # starts 01: GS1
        ("]C0" + CN[:-1], "20-digit code: 19 digits"),
        ("]C0" + "x" + CN, "20-digit code: character 'x' at position 1 is not a digit"),
        ("]C0" + "01" + G + "21AB", "20-digit code: character 'A' at position 19 is not a digit"),
        ("]Q1" + CN + "\x1d", "20-digit code: character U+001D at position 21 is not a digit"),
        ("hello", "20-digit code: character 'h' at position 1 is not a digit"),
        ("17" + "261231" + "10ABC", "20-digit code: character 'A' at position 11 is not a digit"),
    ],
)
def test_cn20_rejections(codec, raw, reason):
    assert codec.parse(raw, P) == bad(reason)


def test_cn20_prefix_switch(codec):
    any_digit = Profile(cn_prefixes="", ref_date=REF)
    five = "5" + CN[1:]
    assert codec.parse(five, any_digit) == ok(KIND_CN20, five, five[:7], five[7:16])
    p89 = Profile(cn_prefixes="98", ref_date=REF)
    nine = "9" + CN[1:]
    assert codec.parse(nine, p89)[0] == KIND_CN20
    assert codec.parse(five, p89) == bad(
        "20-digit code: leading digit 5 not admitted (admitted: 8, 9)"
    )


def test_cn20_all_digit_01_is_gs1_unless_0_admitted(codec):
    twenty = "01" + G + "2112"  # 20 digits: GS1 01 + serial "12", or a Chinese code?
    assert codec.parse(twenty, P) == gs1("12")
    zero = Profile(cn_prefixes="08", ref_date=REF)
    assert codec.parse(twenty, zero) == ok(KIND_CN20, twenty, twenty[:7], twenty[7:16])
    assert codec.parse("]d2" + twenty, zero) == gs1("12")


@pytest.mark.parametrize(
    "raw",
    [
        "https://yao.example.cn/v/" + CN,
        "http://x.cn/trace/" + CN + "/",
        "https://x.cn/q?code=" + CN,
        "https://x.cn/q?a=1&code=" + CN + "&b=2",
        "https://x.cn/q?" + CN,
        "https://x.cn/" + CN + "#top",
        "HTTPS://X.CN/" + CN,
        "]Q1https://x.cn/v?c=" + CN,
        "]d1http://x.cn/" + CN,
        " https://x.cn/v/" + CN + "\r\n",
        "https://x.cn/2024/01/05/" + CN,  # a '01' segment that is not a Digital Link
        "https://x.cn/v/" + "８" + CN[1:],  # full-width digit inside the URL
    ],
)
def test_cn20_in_url(codec, raw):
    assert codec.parse(raw, P) == CN_OK


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("https://x.cn/v/" + CN + "/" + CN, "URL: 2 20-digit codes, ambiguous"),
        ("https://x.cn/v/" + CN + "?c=" + CN, "URL: 2 20-digit codes, ambiguous"),
        ("https://x.cn/v/" + CN[:-1], "URL: no 20-digit code and no GS1 Digital Link path"),
        ("https://x.cn/v/" + CN + "0", "URL: no 20-digit code and no GS1 Digital Link path"),
        ("https://x.cn/v/c" + CN, "URL: no 20-digit code and no GS1 Digital Link path"),
        ("https://x.cn/v/" + CN + "x", "URL: no 20-digit code and no GS1 Digital Link path"),
        ("https://" + CN + "/", "URL: no 20-digit code and no GS1 Digital Link path"),  # host
        ("https://", "URL: no 20-digit code and no GS1 Digital Link path"),
        ("https://x.cn/v/5" + CN[1:], "20-digit code: leading digit 5 not admitted (admitted: 8)"),
    ],
)
def test_cn20_url_rejections(codec, raw, reason):
    assert codec.parse(raw, P) == bad(reason)


# --- GS1 element strings ------------------------------------------------------------------------

E_FULL = "01" + G + "17261231" + "10B123" + GS + "21SN0001"
FULL = gs1("SN0001", "B123", 20261231)


@pytest.mark.parametrize("aim", ["", "]d2", "]Q3", "]C1", "]e0"])
def test_element_string_with_each_symbology(codec, aim):
    assert codec.parse(aim + E_FULL, P) == FULL
    assert codec.parse(aim + GS + E_FULL, P) == FULL  # first FNC1 transmitted
    assert codec.parse(aim + E_FULL + GS, P) == FULL  # trailing separator
    assert codec.parse(aim + GS + GS + E_FULL.replace(GS, GS * 3) + GS * 2, P) == FULL  # repeated
    assert codec.parse(" " + aim + E_FULL + "\r\n", P) == FULL


@pytest.mark.parametrize(
    "raw",
    [
        "]d2" + "17261231" + "01" + G + "21SN0001" + GS + "10B123",
        "]d2" + "21SN0001" + GS + "10B123" + GS + "01" + G + "17261231",
        "]d2" + "10B123" + GS + "17261231" + "21SN0001" + GS + "01" + G,
        "]d2" + "01" + G + GS + "17261231" + GS + "10B123" + GS + "21SN0001",  # GS after fixed
        "10B123" + GS + "01" + G + "17261231" + "21SN0001",  # no identifier, has a GS
    ],
)
def test_element_order_and_optional_separators(codec, raw):
    assert codec.parse(raw, P) == FULL


def test_element_string_minimal_and_extra_ais(codec):
    assert codec.parse("01" + G + "21X", P) == gs1("X")
    extras = "]d2" + "01" + G + "11250101" + "17270100" + "7100A" + GS + "240P-1" + GS + "21S"
    assert codec.parse(extras, P) == gs1("S", expiry=20270131)
    nhrn = "]d2" + "01" + G + "712" + "CN12345" + GS + "714" + "PT1" + GS + "21S"
    assert codec.parse(nhrn, P) == gs1("S")
    sscc = "00" + gtin("03456789012345678")
    assert codec.parse("]d2" + sscc + "01" + G + "21S", P) == gs1("S")


@pytest.mark.parametrize(
    "subs, sep",
    [(("|",), "|"), (("^",), "^"), (("~",), "~"), (("<GS>",), "<GS>"), (("<GS>", "|"), "|")],
)
def test_profile_gs_substitutes(codec, subs, sep):
    p = Profile(gs_substitutes=subs, ref_date=REF)
    raw = "01" + G + "17261231" + "10B123" + sep + "21SN0001"
    assert codec.parse(raw, p) == FULL
    assert codec.parse("]d2" + sep + raw + sep, p) == FULL
    assert codec.parse(raw.replace(sep, GS), p) == FULL  # real GS still works


def test_substitute_without_profile_is_rejected(codec):
    raw = "01" + G + "10B123|21SN0001"
    assert codec.parse(raw, P) == bad("AI 10: character '|' at position 5 not in set 82")


def test_missing_separator_is_never_guessed(codec):
    # Without the GS the batch swallows "21SN0001": no split is guessed, the pack is not serialised.
    assert codec.parse("]d2" + "01" + G + "10B12321SN0001", P) == bad(
        "GS1: not serialised (no AI 21)"
    )


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("]d2" + "01" + G[:-1] + "0" + "21X", f"GTIN check digit: expected {G[-1]}, got 0"),
        ("]d2" + "01" + G[:8], "AI 01: 8 characters, expected 14"),
        ("]d2" + "01" + G[:8] + GS + "21X", "AI 01: 8 characters, expected 14"),
        ("]d2" + "01" + G[:5] + "A" + G[6:] + "21X", "AI 01: character 'A' at position 6 is not a digit"),
        ("]d2" + "01" + G + "21SN#1", "AI 21: character '#' at position 3 not in set 82"),
        ("]d2" + "01" + G + "21ABCD#", "AI 21: character '#' at position 5 not in set 82"),
        ("]d2" + "01" + G + "21A B", "AI 21: character ' ' at position 2 not in set 82"),
        ("]d2" + "01" + G + "21A\x07", "AI 21: character U+0007 at position 2 not in set 82"),
        ("]d2" + "01" + G + "21" + "A" * 21, "AI 21: 21 characters, maximum 20"),
        ("]d2" + "01" + G + "10" + "B" * 21 + GS + "21X", "AI 10: 21 characters, maximum 20"),
        ("]d2" + "01" + G + "21" + GS + "10B", "AI 21: empty value"),
        ("]d2" + "01" + G + "21", "AI 21: empty value"),
        ("]d2" + "01" + G + "21X" + GS + GS + "1", "GS1: incomplete AI at position 25"),
        ("]d2" + "01" + G + "21X" + GS + "A", "GS1: expected an AI at position 24, got 'A'"),
        ("]d2" + "01" + G + "21X" + GS + "1", "GS1: incomplete AI at position 24"),
        ("]d2" + "01" + G + "21X" + GS + "1A", "GS1: incomplete AI at position 24"),
        ("]d2" + "01" + G + "27X" + GS + "21X", "GS1: unknown AI 27 at position 20"),
        ("]d2" + "01" + G + "8030X" + GS + "21X", "GS1: unknown AI 8030 at position 20"),
        ("]d2" + "01" + G + "803", "GS1: unknown AI 803 at position 20"),
        ("]d2" + "01" + G + "04" + G + "21X", "GS1: unknown AI 04 at position 20"),
        ("]d2" + "01" + G + "17261331" + "21X", "AI 17: month 13 not valid in date 261331"),
        ("]d2" + "01" + G + "17260031" + "21X", "AI 17: month 00 not valid in date 260031"),
        ("]d2" + "01" + G + "17260431" + "21X", "AI 17: day 31 not valid for 2026-04 in date 260431"),
        ("]d2" + "01" + G + "17270229" + "21X", "AI 17: day 29 not valid for 2027-02 in date 270229"),
        ("]d2" + "01" + G + "172612" + "21X", "GS1: expected an AI at position 28, got 'X'"),
        ("]d2" + "01" + G + "1726123" + GS + "21X", "AI 17: 5 characters, expected 6"),
        ("]d2" + "01" + G + "112613x1" + "21X", "AI 11: character 'x' at position 5 is not a digit"),
        ("]d2" + "01" + G + "21X" + GS + "21Y", "GS1: AI 21 appears twice with different values"),
        ("]d2" + "17261231" + "21X", "GS1: no GTIN (AI 01)"),
        ("]d2" + "21X", "GS1: no GTIN (AI 01)"),
        ("]d2" + GS, "GS1: no GTIN (AI 01)"),
        ("]d2" + "01" + G, "GS1: not serialised (no AI 21)"),
        ("]d2" + "01" + G + "10B", "GS1: not serialised (no AI 21)"),
        ("]d2" + "02" + G + "37" + "12" + GS + "21X", "GS1: no GTIN (AI 01)"),
        ("]d2" + "01" + G + "4220" + GS + "21X", "AI 422: 1 characters, expected 3"),
        ("]d2" + "01" + G + "421" + "12" + GS + "21X", "AI 421: 2 characters, minimum 4"),
    ],
)
def test_element_string_rejections(codec, raw, reason):
    assert codec.parse(raw, P) == bad(reason)


def test_duplicate_with_same_value_is_accepted(codec):
    raw = "]d2" + "01" + G + "21X" + GS + "01" + G + "21X"
    assert codec.parse(raw, P) == gs1("X")


def test_too_many_elements(codec):
    p = Profile(ref_date=REF, max_length=4096)
    measures = [a for a in sorted(fallback.AI_TABLE) if a[:2] in ("31", "32")][:70]
    body = "".join(a + "000100" for a in measures)  # predefined length: no separators needed
    assert codec.parse("]d2" + "01" + G + "21X" + GS + body, p) == bad("GS1: more than 64 elements")
    assert codec.parse("]d2" + "01" + G + "21X" + GS + body[: 62 * 10], p) == gs1("X")


@pytest.mark.parametrize(
    "ai17, expiry",
    [
        ("261231", 20261231),
        ("261200", 20261231),  # day 00 = last day of the month
        ("280200", 20280229),  # leap year
        ("270200", 20270228),
        ("000200", 20000229),  # 2000 is a leap year
        ("260400", 20260430),
        ("760101", 20760101),  # +50 years from 2026: this century
        ("770101", 19770101),  # +51: previous century
        ("770229", None),  # 1977 is not a leap year
    ],
)
def test_expiry_dates(codec, ai17, expiry):
    r = codec.parse("]d2" + "01" + G + "17" + ai17 + "21X", P)
    if expiry is None:
        assert r[0] == KIND_MALFORMED and r[6].startswith("AI 17: day 29")
    else:
        assert r == gs1("X", expiry=expiry)


def test_sliding_window_follows_ref_date(codec):
    raw = "]d2" + "01" + G + "17000101" + "21X"
    assert codec.parse(raw, Profile(ref_date=datetime.date(2099, 1, 1)))[5] == 21000101
    assert codec.parse(raw, Profile(ref_date=datetime.date(2049, 1, 1)))[5] == 20000101
    assert codec.parse(raw, Profile(ref_date=datetime.date(1951, 1, 1)))[5] == 20000101
    assert codec.parse(raw, Profile(ref_date=datetime.date(1950, 1, 1)))[5] == 20000101  # +50
    assert codec.parse(raw, Profile(ref_date=datetime.date(1949, 1, 1)))[5] == 19000101  # -49
    # Without ref_date the window is centred on today's year.
    year = datetime.date.today().year
    r = codec.parse("]d2" + "01" + G + "17" + f"{year % 100:02d}0615" + "21X")
    assert r[5] == year * 10000 + 615


def test_production_date_day_00_is_accepted(codec):
    # Decision (docs/codes.md): DD=00 is valid for every YYMMDD AI, as the GS1 Gen Specs allow.
    assert codec.parse("]d2" + "01" + G + "11260200" + "21X", P) == gs1("X")
    assert codec.parse("]d2" + "01" + G + "11260230" + "21X", P) == bad(
        "AI 11: day 30 not valid for 2026-02 in date 260230"
    )


def test_check_digit_of_other_ais(codec):
    body = "03456789012345678"
    want = fallback.gtin_check_digit(body)
    wrong = (want + 1) % 10
    r = codec.parse("]d2" + "00" + body + str(wrong) + "01" + G + "21X", P)
    assert r == bad(f"AI 00 check digit: expected {want}, got {wrong}")
    gln = "414" + "123456789012" + "0"
    want = fallback.gtin_check_digit("123456789012")
    if want != 0:
        assert codec.parse("]d2" + "01" + G + gln + "21X", P)[6] == (
            f"AI 414 check digit: expected {want}, got 0"
        )


# --- parenthesised (human-readable) form --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "(01)" + G + "(17)261231(10)B123(21)SN0001",
        "(21)SN0001(10)B123(17)261231(01)" + G,
        " (01)" + G + "(17)261231(10)B123(21)SN0001\r\n",
        "]d2(01)" + G + "(17)261231(10)B123(21)SN0001",  # tolerated after a GS1 identifier
        "（０１）" + G + "（１７）261231（１０）B123（２１）SN0001",  # full-width parentheses
    ],
)
def test_parenthesised(codec, raw):
    assert codec.parse(raw, P) == FULL


def test_parenthesised_value_may_contain_parentheses(codec):
    # '(' is in set 82: a value runs to the next '(' that starts a well-formed "(NN)" group.
    assert codec.parse("(01)" + G + "(21)A(B)C(1)", P) == gs1("A(B)C(1)")


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("(01)" + G + " (21)X", "AI 01: 15 characters, expected 14"),
        ("(01)" + G + "(21)X Y", "AI 21: character ' ' at position 2 not in set 82"),
        ("(01)" + G + "(99999)X", "AI 01: 22 characters, expected 14"),
        ("(01)" + G + "(27)X(21)Y", "GS1: unknown AI 27 at position 20"),
        ("(1)" + G + "(21)X", "GS1: malformed AI in parentheses at position 1"),
        ("(01" + G + "(21)X", "GS1: malformed AI in parentheses at position 1"),
        ("]d2(01)" + G + "(21)X(", None),
        ("(01)" + G + "(21)", "AI 21: empty value"),
        ("(01)" + G[:-1] + "(21)X", "AI 01: 13 characters, expected 14"),
        ("(01)" + G + "(21)X(21)Y", "GS1: AI 21 appears twice with different values"),
        ("(01)" + G, "GS1: not serialised (no AI 21)"),
        ("(01)" + G + GS + "(21)X", "AI 01: 15 characters, expected 14"),
    ],
)
def test_parenthesised_rejections(codec, raw, reason):
    if reason is None:
        # '(' alone at the end is part of the value, and '(' is in set 82: accepted.
        assert codec.parse(raw, P) == gs1("X(")
    else:
        assert codec.parse(raw, P) == bad(reason)


# --- GS1 Digital Link ---------------------------------------------------------------------------

DL_FULL = "https://id.gs1.org/01/" + G + "/10/B123/21/SN0001?17=261231"


@pytest.mark.parametrize(
    "raw",
    [
        DL_FULL,
        "http://example.com/01/" + G + "/10/B123/21/SN0001?17=261231",
        "HTTPS://EXAMPLE.COM/01/" + G + "/10/B123/21/SN0001?17=261231",
        "https://brand.example/some/prefix/01/" + G + "/10/B123/21/SN0001?17=261231",
        "https://x.y:8443/01/" + G + "/22/V1/10/B123/21/SN0001?17=261231&linkType=gs1:pip",
        "https://x.y/01/" + G[1:] + "/10/B123/21/SN0001?17=261231",  # GTIN-13 padded
        "https://x.y/01/" + G + "/21/SN0001/10/B123?17=261231",  # qualifier order not enforced
        "https://x.y/01/" + G + "/21/SN0001?10=B123&17=261231",
        "https://x.y/01/" + G + "/21/SN%30001?17=261231&10=B%3123",
        "https://x.y/01/" + G + "/10/B123/21/SN0001/?17=261231",  # trailing slash
        "https://x.y/01/" + G + "/10/B123/21/SN0001?17=261231#frag",
        "https://x.y/01/" + G + "/10/B123/21/SN0001?exp=1&17=261231&=x&&q",
        "]d1" + DL_FULL,
        "]Q1" + DL_FULL,
        " ]Q1" + DL_FULL + "\r\n",
        "https://x.y/01/%30" + G[1:] + "/10/B123/21/SN0001?17=261231",
    ],
)
def test_digital_link(codec, raw):
    assert codec.parse(raw, P) == FULL


def test_digital_link_short_gtins(codec):
    g13, g8 = G[1:], G8[6:]
    assert codec.parse(f"https://x/01/{g13}/21/A", P) == gs1("A")
    g12 = gtin("00" + "61414100001")  # a UPC-A (GTIN-12) carried as GTIN-14
    assert codec.parse(f"https://x/01/{g12[2:]}/21/A", P) == gs1("A", g=g12)
    assert codec.parse(f"https://x/01/{g8}/21/A", P) == gs1("A", g=G8)
    assert codec.parse("]d2" + "01" + G8 + "21A", P) == gs1("A", g=G8)


def test_digital_link_percent_decoding(codec):
    r = codec.parse("https://x/01/" + G + "/21/A%2FB%25C%21", P)
    assert r == gs1("A/B%C!")
    assert codec.parse("https://x/01/" + G + "/21/a%2fb", P) == gs1("a/b")
    assert codec.parse("https://x/01/" + G + "/21/A+B", P) == gs1("A+B")  # '+' is literal


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("https://x/01/" + G + "/21/A%2", "Digital Link: bad percent-encoding at position 33"),
        ("https://x/01/" + G + "/21/A%G1", "Digital Link: bad percent-encoding at position 33"),
        ("https://x/01/" + G + "/21/A?17=%", "Digital Link: bad percent-encoding at position 37"),
        ("https://x/01/" + G + "/21/A%23", "AI 21: character '#' at position 2 not in set 82"),
        ("https://x/01/" + G + "/21/A%C3%A9", "AI 21: character U+00C3 at position 2 not in set 82"),
        ("https://x/01/" + G + "/21/A%1D", "AI 21: character U+001D at position 2 not in set 82"),
        ("https://x/01/" + G + "/21/" + "A" * 21, "AI 21: 21 characters, maximum 20"),
        ("https://x/01/" + G + "/21/A?17=261331", "AI 17: month 13 not valid in date 261331"),
        ("https://x/01/" + G + "/21/A?17=2612", "AI 17: 4 characters, expected 6"),
        ("https://x/01/" + G + "/21/A?17", "AI 17: 0 characters, expected 6"),
        ("https://x/01/" + G + "/21/A?99999=1", "Digital Link: unknown AI 99999 in query at position 34"),
        ("https://x/01/" + G + "/21/A?27=1", "Digital Link: unknown AI 27 in query at position 34"),
        ("https://x/01/" + G + "/21/A?21=B", "GS1: AI 21 appears twice with different values"),
        ("https://x/01/" + G[:-1] + "0/21/A", f"GTIN check digit: expected {G[-1]}, got 0"),
        ("https://x/01/12345678901/21/A", "Digital Link: GTIN has 11 digits (8, 12, 13 or 14 expected)"),
        ("https://x/01/" + G + "1/21/A", "Digital Link: GTIN has 15 digits (8, 12, 13 or 14 expected)"),
        ("https://x/01//21/A", "Digital Link: GTIN has 0 digits (8, 12, 13 or 14 expected)"),
        ("https://x/01/" + G[:5] + "x" + G[6:] + "/21/A", "AI 01: character 'x' at position 6 is not a digit"),
        ("https://x/01/" + G, "GS1: not serialised (no AI 21)"),
        ("https://x/01/" + G + "/10/B", "GS1: not serialised (no AI 21)"),
        ("https://x/01/" + G + "/21", "Digital Link: path after /01/ is not AI/value pairs (22, 10, 21)"),
        ("https://x/01/" + G + "/17/261231/21/A", "Digital Link: path after /01/ is not AI/value pairs (22, 10, 21)"),
        ("https://x/01/" + G + "/21//", "AI 21: empty value"),
        ("https://x/00/" + G + "/21/A", "URL: no 20-digit code and no GS1 Digital Link path"),
        ("]d2https://x/01/" + G + "/21/A", "GS1: expected an AI at position 4, got 'h'"),
    ],
)
def test_digital_link_rejections(codec, raw, reason):
    assert codec.parse(raw, P) == bad(reason)


def test_same_pack_same_key_in_every_form(codec):
    forms = [
        "]d2" + E_FULL,
        "]Q3" + GS + E_FULL,
        "]C1" + E_FULL + "\r\n",
        "(01)" + G + "(17)261231(10)B123(21)SN0001",
        DL_FULL,
        "]Q1https://other.host/p/01/" + G[1:] + "/10/B123/21/SN%300%301?17=261231",
        "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in "]d2" + E_FULL),
    ]
    assert {codec.parse(f, P) for f in forms} == {FULL}
    sub = Profile(gs_substitutes=("<GS>",), ref_date=REF)
    assert codec.parse(E_FULL.replace(GS, "<GS>"), sub) == FULL


# --- never raises; twins agree ------------------------------------------------------------------

NASTY = [
    "\x00", "\x00" * 30, "]", "]]]]", "(", "((((", ")", "()", "(0)", "(01)", "(01)(21)", "%", "%%",
    "http://", "https://", "https:///", "https://?", "https://#", "https://x/01/", "https://x/01",
    "https://x/01/" + G + "/21/A?&&&=&=", "https://x/?=&", "\x1d", "\x1d" * 5, "|", "<GS>",
    "0", "01", "011", "0" * 600, "8" * 512, "\ud800", "\udfff", "\U0001F600", "\uffff", "\ufeff",
    "\u3000", "\t\n\r\v\f", "]d2" + "\x1d" * 10, "]d2" + "01" * 40, "21" * 100, "(21)" * 100,
    "https://x/" + "/" * 300, "https://x/" + "01/" * 100, "https://x/" + "%41" * 150,
    "]Q1https://x/" + CN + "/01/" + G + "/21/A",
]


@pytest.mark.parametrize("raw", NASTY)
def test_nasty_inputs_never_raise(codec, raw):
    r = codec.parse(raw, P)
    assert len(r) == 7
    if r[0] == KIND_MALFORMED:
        assert r[6] and r[1:6] == ("", "", "", "", 0)


def _corpus(seed, count):
    """Valid scans in every form, then mutated: deletions, insertions, replacements, swaps."""
    rnd = random.Random(seed)
    base = [
        CN, "]C0" + CN, " " + CN + "\r\n", "https://x.cn/v?c=" + CN,
        "]d2" + E_FULL, E_FULL, "(01)" + G + "(17)261231(10)B123(21)SN0001", DL_FULL,
        "https://x.y/01/" + G[1:] + "/22/V/21/A%2FB?17=270200&10=L1", "]d2" + GS + "01" + G + "21X",
        "]d2" + "01" + G + "11260200" + "17280200" + "7123X" + GS + "240Z" + GS + "21Q",
        "01" + G + "10B|21S", "01" + G + "10B<GS>21S",
    ]
    pieces = [
        "0", "1", "2", "7", "8", "9", "(", ")", "/", "%", "?", "&", "=", "#", "]", "|", "<GS>", GS,
        " ", "\r\n", "A", "z", "é", "\u3000", "１", "（", "01", "21", "10", "17", "%2", "%41",
        "]d2", "]Q1", "https://", "/01/", "/21/", "(21)", "(01)",
    ]
    out = []
    while len(out) < count:
        s = rnd.choice(base)
        for _ in range(rnd.randint(0, 3)):
            i = rnd.randint(0, len(s))
            op = rnd.random()
            if op < 0.3:
                s = s[:i] + s[i + 1 :]
            elif op < 0.6:
                s = s[:i] + rnd.choice(pieces) + s[i:]
            elif op < 0.9:
                s = s[:i] + rnd.choice(pieces) + s[i + 1 :]
            else:
                s = s[i:] + s[:i]
        out.append(s)
    return out


PROFILES = [
    P,
    Profile(gs_substitutes=("|",), ref_date=REF),
    Profile(gs_substitutes=("<GS>", "|"), cn_prefixes="", ref_date=datetime.date(2001, 1, 1)),
    Profile(cn_prefixes="089", max_length=60, ref_date=datetime.date(2075, 12, 31)),
]


# The corpus seed of each profile: fixed, so a failure replays in any process (hash() of a
# Profile changes per process). TRACECODE_CODEC_SEED=N explores another corpus; the seed is in
# the test id and in every failure message.
_SEED = os.environ.get("TRACECODE_CODEC_SEED")
SEEDS = [int(_SEED)] * len(PROFILES) if _SEED else [1, 2, 3, 4]


@pytest.mark.parametrize(("profile", "seed"), list(zip(PROFILES, SEEDS)),
                         ids=[f"{n}-seed{s}" for n, s in zip(["default", "pipe", "gs-any", "089-short"], SEEDS)])
def test_twins_identical_on_mutated_corpus(profile, seed):
    compiled = _compiled()
    corpus = _corpus(seed, 20_000)
    got = compiled.parse_many(corpus, profile)
    want = fallback.parse_many(corpus, profile)
    diffs = [(s, a, b) for s, a, b in zip(corpus, got, want) if a != b]
    assert not diffs, (f"seed {seed} (replay: TRACECODE_CODEC_SEED={seed})", diffs[:5])
    kinds = {r[0] for r in want}
    assert kinds == {KIND_MALFORMED, KIND_CN20, KIND_GS1}, f"seed {seed}"  # the corpus exercises every outcome
    for r in want:
        assert (r[6] == "") == (r[0] != KIND_MALFORMED)


def test_twins_identical_on_case_tables():
    compiled = _compiled()
    scans = list(NASTY)
    for module in (sys.modules[__name__],):
        for name in dir(module):
            obj = getattr(module, name)
            marks = getattr(obj, "pytestmark", [])
            for m in marks:
                if m.name == "parametrize":
                    for v in m.args[1]:
                        if isinstance(v, tuple) and v and isinstance(v[0], str):
                            scans.append(v[0])
                        elif isinstance(v, str):
                            scans.append(v)
    assert len(scans) > 150
    for profile in PROFILES:
        assert compiled.parse_many(scans, profile) == fallback.parse_many(scans, profile)
