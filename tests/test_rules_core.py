"""The rules core (rules/): one table of insured-id spellings, the free-text rule, spreadsheet
cells, and the server's text log that no input can forge a line of (issue 23)."""
from __future__ import annotations

import logging

import pytest

from tracecode.rules import cells, insured, text
from tracecode.rules.pseudonym import Pseudonymizer

PERSON = "11010519491231002X"  # a valid resident id: GB 11643 check character X

# Every spelling a probe settled as another person while PERSON's card was suspended, and more of
# the same kinds. Each must normalise to PERSON.
SAME = [
    ("full-width digits and X", "１１０１０５１９４９１２３１００２Ｘ"),
    ("full-width X only", "11010519491231002Ｘ"),
    ("lower-case check character", "11010519491231002x"),
    ("zero-width space inside", "1101051949\u200b1231002X"),
    ("BOM in front", "\ufeff11010519491231002X"),
    ("word joiner", "110105\u20601949123 1002X"),
    ("spaces between groups", "110105 19491231 002X"),
    ("hyphens between groups", "110105-19491231-002X"),
    ("full-width hyphen, en dash", "110105－19491231–002X"),
    ("ideographic and no-break spaces", "\u3000110105\xa019491231002X "),
    ("tab and newline around", "\t11010519491231002X\n"),
    ("soft hyphen", "1101051949\xad1231002X"),
    ("bidi marks", "\u200e11010519491231002X\u202c"),
]

# Not an id of any documented format: refused, naming the rule and never the id.
INVALID = [
    ("trailing NUL", "11010519491231002X\x00"),
    ("Cyrillic Х for X", "11010519491231002\u0425"),
    ("wrong check character", "110105194912310021"),
    ("a digit added in front", "011010519491231002X"),
    ("17 digits", "11010519491231002"),
    ("16 digits", "1101051949123100"),
    ("punctuation", "AB/12345"),
    ("65 characters", "A" * 65),
    ("Chinese", "张三"),
]


@pytest.mark.parametrize("what,spelling", SAME, ids=[w for w, _ in SAME])
def test_every_spelling_of_one_id_is_that_id(what, spelling):
    assert insured.normalise(spelling) == PERSON
    assert insured.check(spelling) == PERSON
    p = Pseudonymizer(b"k" * 32)
    assert p.pseudonym(spelling) == p.pseudonym(PERSON) == p.pseudonym_many([spelling])[0]


@pytest.mark.parametrize("what,raw", INVALID, ids=[w for w, _ in INVALID])
def test_ids_of_no_documented_format_are_refused_without_echoing_them(what, raw):
    with pytest.raises(insured.InsuredIdError) as err:
        insured.check(raw)
    message = str(err.value)
    assert err.value.rule == message and message
    assert raw not in message and raw.strip("\x00")[:10] not in message


@pytest.mark.parametrize("raw", ["", " ", "\u3000\t", "\u200b", "-", " - "])
def test_an_id_that_normalises_to_nothing_is_absent(raw):
    assert insured.check(raw) == "" and Pseudonymizer(b"k" * 32).pseudonym(raw) == ""


@pytest.mark.parametrize("raw", ["110101199003077774", "11010519491231002X", "810000199408230013",
                                 "110105491231002", "E12345678", "H1234567801", "P1", "x1"])
def test_documented_formats_are_accepted(raw):
    assert insured.check(raw) == raw.upper()


def test_the_check_character_is_gb_11643():
    # Worked example of the standard: 11010519491231002 -> X.
    assert insured.resident_check_char("11010519491231002") == "X"
    assert insured.resident_check_char("11010119900307777") == "4"


@pytest.mark.parametrize("value,bad", [
    ("evil\nINFO forged", "U+000A"), ("nul\x00", "U+0000"), ("esc\x1b[31m", "U+001B"), ("del\x7f", "U+007F"),
    ("c1\x85", "U+0085"), ("rlo\u202eexe.pdf", "U+202E"), ("isolate\u2066", "U+2066"), ("zwsp\u200b", "U+200B"),
    ("bom\ufeff", "U+FEFF"), ("line sep\u2028", "U+2028"), ("para\u2029", "U+2029"),
])
def test_free_text_refuses_control_format_and_override_characters(value, bad):
    problem = text.text_problem(value, 100, "reason")
    assert problem is not None and bad in problem and value not in problem


@pytest.mark.parametrize("value", ["阿莫西林胶囊 0.25g×24粒", "Batch B-2024/07", "O'Brien & Co. (GmbH)", "Ünïcödé"])
def test_free_text_accepts_printable_text(value):
    assert text.text_problem(value, 100, "name") is None


def test_text_problems_names_each_bad_field():
    assert text.problems([("actor", "a\nb", 10, False), ("reason", "", 10, True), ("ref", "ok", 10, False),
                          ("batch", "x" * 11, 10, False)]) == [
        ("actor", "control character U+000A at position 2"), ("reason", "required: reason"),
        ("batch", "11 characters, at most 10")]


@pytest.mark.parametrize("value,written", [
    ('=HYPERLINK("http://evil.example/","x")', '\'=HYPERLINK("http://evil.example/","x")'),
    ("+1+1", "'+1+1"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("PH-A-1", "PH-A-1"), ("", ""), (-1.5, -1.5), (3, 3), (None, None),
])
def test_cells_that_look_like_formulas_are_neutralised(value, written):
    assert cells.neutralise(value) == written
    assert cells.neutralise_row([value, "ok"]) == [written, "ok"]


def test_the_text_log_cannot_be_forged(caplog):
    """Issue 23, 2: an actor "evil\\nINFO forged\\x00" gave the server's text log a second line
    beginning `INFO forged`, with a raw NUL."""
    from tracecode.server.logs import TextFormatter

    fmt = TextFormatter()
    record = logging.LogRecord("tracecode.test", logging.WARNING, __file__, 1, "sanction by %s: %s",
                               ("evil\nINFO forged\x00", "\u202eok 中文 \\"), None)
    line = fmt.format(record)
    assert "\n" not in line and "\x00" not in line and "\u202e" not in line
    assert line.endswith("sanction by evil\\x0aINFO forged\\x00: \\u202eok 中文 \\\\")
    try:
        raise ValueError("bad\nINFO forged")
    except ValueError:
        import sys
        record = logging.LogRecord("tracecode.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = fmt.format(record).split("\n")
    assert lines[0].endswith("ERROR tracecode.test: failed")
    assert all(ln.startswith("    ") for ln in lines[1:]) and any("INFO forged" in ln for ln in lines[1:])


@pytest.mark.parametrize("value", ['=HYPERLINK("http://evil.example/","x")', "+1", "-PH-1", "@x", "\tx", "PH-A", "", "'quoted",
                                   "'"])
def test_restore_undoes_neutralise(value):
    assert cells.restore(cells.neutralise(value)) == value
