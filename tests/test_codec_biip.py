"""Cross-check against biip (a maintained GS1 parser; test-only dependency).

On a corpus of GS1 element strings, human-readable strings and Digital Link URIs: wherever biip
accepts the input (and it identifies a serialised pack), both twins accept it too and return the
same GTIN, serial, batch and expiry.

"biip accepts" means: no ParseError, no GTIN/SSCC check-digit error flagged on an element (biip
parses those and only flags them), and no AI present twice with different values (biip keeps both;
our codec rejects the scan as inconsistent, see docs/codes.md).
"""
import datetime
import os
import random
import urllib.parse

import pytest

biip = pytest.importorskip("biip")
from biip import ParseConfig, ParseError  # noqa: E402
from biip.gs1_digital_link_uris import GS1DigitalLinkURI  # noqa: E402
from biip.gs1_messages import GS1Message  # noqa: E402

from tracecode.codec import KIND_GS1, KIND_MALFORMED, Profile, fallback  # noqa: E402
from tracecode.codec.tables import CHARSET82  # noqa: E402

GS = "\x1d"
PIPE = Profile(gs_substitutes=("|",))  # ref_date None: today, as biip's century window


def _compiled():
    try:
        from tracecode.codec import _codec
    except ImportError:
        if os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip("compiled codec disabled by TRACECODE_NO_EXTENSIONS")
        pytest.fail("tracecode.codec._codec is not built")
    return _codec


@pytest.fixture(scope="module", params=["compiled", "python"])
def codec(request):
    return _compiled() if request.param == "compiled" else fallback


def _gtin(rnd):
    width = rnd.choice([8, 12, 13, 14])
    body = "".join(rnd.choice("0123456789") for _ in range(width - 1)).rjust(13, "0")
    return body + str(fallback.gtin_check_digit(body))


def _text(rnd, lo=1, hi=20):
    return "".join(rnd.choice(CHARSET82) for _ in range(rnd.randint(lo, hi)))


def _date(rnd):
    this_year = datetime.date.today().year
    year = rnd.randint(this_year - 40, this_year + 40)
    month = rnd.randint(1, 12)
    day = rnd.choice([0, 1, 15, 28, 29, 30, 31]) if rnd.random() < 0.6 else rnd.randint(0, 31)
    return f"{year % 100:02d}{month:02d}{day:02d}"


def _pack(rnd):
    els = [("01", _gtin(rnd))]
    if rnd.random() < 0.7:
        els.append(("17", _date(rnd)))
    if rnd.random() < 0.3:
        els.append(("11", _date(rnd)))
    if rnd.random() < 0.7:
        els.append(("10", _text(rnd)))
    if rnd.random() < 0.2:
        els.append((rnd.choice(["240", "712", "714", "91"]), _text(rnd, 1, 20)))
    if rnd.random() < 0.95:
        els.append(("21", _text(rnd)))
    if rnd.random() < 0.1:
        els.append(rnd.choice(els))  # same AI twice, same value
    if rnd.random() < 0.05:
        els.append(("21", _text(rnd)))  # same AI twice, likely a different value
    head, tail = els[:1], els[1:]
    rnd.shuffle(tail)
    return head + tail


def _element_string(els, sep):
    out = []
    for i, (ai, value) in enumerate(els):
        out.append(ai + value)
        predefined = ai[:2] in ("01", "11", "17")
        if not predefined and i < len(els) - 1:
            out.append(sep)
    return "".join(out)


def _digital_link(els, rnd):
    d = dict(els)  # last value wins; duplicates are exercised by the element strings
    if "21" not in d:
        return None
    g = d["01"].lstrip("0").rjust(13, "0") if rnd.random() < 0.5 else d["01"]
    path = f"/01/{g}"
    for ai in ("10", "21"):
        if ai in d:
            path += f"/{ai}/" + urllib.parse.quote(d[ai], safe="" if rnd.random() < 0.5 else "()*!")
    query = "&".join(f"{ai}={d[ai]}" for ai in ("17", "11") if ai in d)
    return f"https://{rnd.choice(['id.gs1.org', 'example.com', 'a.b.cn:8080'])}{path}" + (
        "?" + query if query else ""
    )


def _mutate(rnd, s):
    i = rnd.randint(0, len(s))
    return s[:i] + rnd.choice(["0", "9", "A", "#", GS, "(", "1", ""]) + s[i + 1 :]


def corpus(count=1500, seed=20260615):
    """(form, text) pairs: element strings, substituted separators, HRI, Digital Links."""
    rnd = random.Random(seed)
    out = []
    while len(out) < count:
        els = _pack(rnd)
        out.append(("gs", _element_string(els, GS)))
        out.append(("pipe", _element_string(els, "|")))
        if all("(" not in v for _, v in els):
            out.append(("hri", "".join(f"({ai}){v}" for ai, v in els)))
        dl = _digital_link(els, rnd)
        if dl:
            out.append(("dl", dl))
        if rnd.random() < 0.3:
            out.append(("gs", _mutate(rnd, _element_string(els, GS))))
    return out


def biip_fields(form, text):
    """biip's reading (gtin, serial, batch, expiry) or None where biip does not accept."""
    try:
        if form == "gs":
            message = GS1Message.parse(text)
        elif form == "pipe":
            message = GS1Message.parse(text, config=ParseConfig(separator_chars=["|"]))
        elif form == "hri":
            message = GS1Message.parse_hri(text)
        else:
            message = GS1DigitalLinkURI.parse(text)
    except ParseError:
        return None
    seen = {}
    for es in message.element_strings:
        if es.gtin_error or es.sscc_error:
            return None
        if seen.setdefault(es.ai.ai, es) is not es and seen[es.ai.ai].value != es.value:
            return None
    if "01" not in seen or "21" not in seen:
        return ("unserialised",)
    expiry = seen["17"].date if "17" in seen else None
    return (
        seen["01"].value,
        seen["21"].value,
        seen["10"].value if "10" in seen else "",
        int(expiry.strftime("%Y%m%d")) if expiry else 0,
    )


CORPUS = corpus()


def test_corpus_is_meaningful():
    accepted = [c for c in CORPUS if biip_fields(*c) not in (None, ("unserialised",))]
    assert len(CORPUS) >= 1500 and len(accepted) >= len(CORPUS) // 2
    assert {form for form, _ in accepted} == {"gs", "pipe", "hri", "dl"}


def test_same_fields_as_biip(codec):
    checked = 0
    mismatches = []
    for form, text in CORPUS:
        want = biip_fields(form, text)
        if want is None:
            continue
        got = codec.parse(text, PIPE if form == "pipe" else None)
        if want == ("unserialised",):
            if got[0] != KIND_MALFORMED:
                mismatches.append((form, text, "biip: not serialised", got))
            continue
        checked += 1
        if got[0] != KIND_GS1 or got[2:6] != want:
            mismatches.append((form, text, want, got))
    assert not mismatches, mismatches[:5]
    assert checked > 1000


def _biip_bounds(fmt):
    """(min, max, digits only) of an AI value from a biip/GS1 format string like N2+X..20."""
    import re

    lo = hi = 0
    digits = True
    for part in fmt.replace("[+", "+[").split("+")[1:]:  # the first part is the AI itself
        optional = part.startswith("[")
        for token in re.findall(r"[NXYZ]\d*(?:\.\.[NXYZ]?\d+)?|-", part.strip("[]")):
            if token == "-":
                hi += 1
                digits = False
                continue
            digits = digits and token[0] == "N"
            size, _, top = token[1:].partition("..")
            top = top.lstrip("NXYZ")  # "N1..N2" is written both ways
            low = int(size) if size else 1
            hi += int(top) if top else low
            lo += 0 if optional else low
    return lo, hi, digits


# Where our table deliberately differs from biip's reading of the GS1 format string.
TABLE_EXCEPTIONS = {
    "425": "N3+N..12: the further country codes are optional (GS1 syntax dictionary), min 3",
}


def test_ai_table_agrees_with_biip():
    from biip.gs1_application_identifiers import _GS1_APPLICATION_IDENTIFIERS as known

    from tracecode.codec.tables import AI_TABLE, K_SET82

    assert set(known) - set(AI_TABLE) == {"8030"}  # digital signature: set 64, not supported
    assert set(AI_TABLE) <= set(known)
    for ai, (lo, hi, kind) in AI_TABLE.items():
        if ai in TABLE_EXCEPTIONS:
            continue
        blo, bhi, digits = _biip_bounds(known[ai].format)
        assert (lo, hi, kind != K_SET82) == (blo, bhi, digits), (ai, known[ai].format)
        assert (ai[:2] in ("00", "01", "02", "03", "11", "12", "13", "15", "16", "17", "20")
                or ai[:2] in ("31", "32", "33", "34", "35", "36", "41")) == (
            not known[ai].separator_required
        ), ai
