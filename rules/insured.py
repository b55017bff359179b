"""Insured persons' ids (参保人证件号码): the one normalisation and the one validation every
component applies before an id is turned into a pseudonym (pseudonym.py) and forgotten.

Why normalise this hard: a card suspension (暂停医保卡结算) is keyed by the pseudonym of the
normalised id, so any spelling of the same id that normalised differently would be a different
person to the gate. The spellings seen at real counters and in probes: full-width digits and
letters (a Chinese keyboard in full-width mode; equal after NFKC), ideographic and no-break
spaces, zero-width spaces, a BOM, hyphens or spaces between the digit groups, a lower-case check
character. All of these are the same person here.

Normalisation (`normalise`), in order:
  1. Unicode NFKC (full-width -> ASCII, compatibility forms folded);
  2. every whitespace character, every format character (Unicode category Cf: zero-width space
     and joiners, BOM, soft hyphen, bidirectional marks) and every dash (category Pd, and U+2212
     MINUS SIGN) removed, wherever it stands;
  3. letters upper-cased (a check character `x` is `X`).

Validation (`check`), on the normalised form, by the first row of FORMATS whose shape matches:
  - an id of 14 to 20 characters that is all digits, or digits with a final X, is a resident
    id (居民身份证, and the residence permits and permanent-residence cards that share its
    numbering: 港澳台居民居住证, 外国人永久居留身份证 since 2023): 18 characters whose last
    is the GB 11643-1999 check character (ISO 7064 MOD 11-2), or the 15-digit first-generation
    number. Anything else of that shape is a mistyped resident id, refused: a digit added in
    front or a wrong check character must not make a new person;
  - any other id is 1 to 64 of A-Z and 0-9 (passports, travel permits 港澳居民来往内地通行证 /
    台湾居民来往大陆通行证, social-security and insurance numbers). Anything outside that alphabet
    after normalisation (a Cyrillic Х, a NUL, punctuation) is refused.
An id that normalises to nothing (only spaces, say) is absent, the same as no id at all.

Errors never carry the id: `InsuredIdError` names the rule only, so a refusal can be logged,
returned to a POS and written to errors.csv without personal data (shared/spec/leads.md).

Imports: the standard library only.
"""
from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_LENGTH", "InsuredIdError", "normalise", "check", "resident_check_char", "FORMATS"]

MAX_LENGTH = 64

# ISO 7064 MOD 11-2 as GB 11643-1999 writes it: weights 2^(17-i) mod 11 for the 17 digits, then
# the check character for the weighted sum mod 11.
_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"

# What step 2 of the normalisation removes, beyond str.isspace(): category Cf and the dashes.
_REMOVED_CATEGORIES = frozenset({"Cf", "Pd", "Zs", "Zl", "Zp"})
_ASCII_KEEP = re.compile(r"[A-Za-z0-9]*\Z")

_RESIDENT_SHAPE = re.compile(r"[0-9]{13,19}[0-9X]\Z")  # 14-20 characters: looks like a resident id
_RESIDENT_18 = re.compile(r"[0-9]{17}[0-9X]\Z")
_RESIDENT_15 = re.compile(r"[0-9]{15}\Z")
_OTHER = re.compile(r"[A-Z0-9]{1,%d}\Z" % MAX_LENGTH)

# The documented formats (docs/security.md, "Insured ids"), as data: name, description.
FORMATS = (
    ("RESIDENT_ID", "18 characters, the last the GB 11643 check character (or the 15-digit first-generation number)"),
    ("OTHER_ID", f"1-{MAX_LENGTH} letters A-Z and digits (passports, permits, social-security numbers)"),
)


class InsuredIdError(ValueError):
    """An insured id breaks a rule. The message names the rule, never the id."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


def normalise(raw: str) -> str:
    """The canonical spelling of an insured id (module docstring, steps 1-3); '' when nothing is left."""
    if _ASCII_KEEP.match(raw):  # the common case: plain ASCII letters and digits
        return raw.upper()
    text = unicodedata.normalize("NFKC", raw)
    kept = [ch for ch in text
            if not ch.isspace() and ch != "\u2212" and unicodedata.category(ch) not in _REMOVED_CATEGORIES]
    return "".join(kept).upper()


def resident_check_char(first17: str) -> str:
    """The GB 11643 check character of a resident id's first 17 digits."""
    return _CHECK[sum(int(d) * w for d, w in zip(first17, _WEIGHTS)) % 11]


def check(raw: str) -> str:
    """The normalised id, '' when absent; raises InsuredIdError when it matches no documented format."""
    norm = normalise(raw)
    if not norm:
        return ""
    if _RESIDENT_SHAPE.match(norm):
        if _RESIDENT_15.match(norm):
            return norm
        if not _RESIDENT_18.match(norm):
            raise InsuredIdError(f"a resident id has 18 characters (or 15 digits), not {len(norm)}")
        if resident_check_char(norm[:17]) != norm[17]:
            raise InsuredIdError("the resident id's check character (GB 11643) does not match its digits")
        return norm
    if len(norm) > MAX_LENGTH:
        raise InsuredIdError(f"{len(norm)} characters, at most {MAX_LENGTH}")
    if not _OTHER.match(norm):
        bad = next(i for i, ch in enumerate(norm) if not ("A" <= ch <= "Z" or "0" <= ch <= "9"))
        # The position and code point of the first bad character identify no one.
        raise InsuredIdError(f"character U+{ord(norm[bad]):04X} at position {bad + 1} is not a letter A-Z or a digit")
    return norm
