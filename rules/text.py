"""Free text the service stores, logs or exports (product ids, batches, names, actors, reasons,
references): one rule for every field, so nothing a client sends can forge a log line, hide text
behind a bidirectional override, or break a CSV row.

A value is refused when it holds a character of Unicode category Cc (C0, DEL, C1 controls: a
newline or NUL would start a forged log line), Cf (format characters: the bidirectional
overrides and isolates U+202A-U+202E, U+2066-U+2069 that make a product id read differently from
what is stored, zero-width characters, the BOM), Zl / Zp (line and paragraph separators) or Cs
(lone surrogates, not encodable). Other printable text, Chinese included, is accepted.

Imports: the standard library only.
"""
from __future__ import annotations

import unicodedata

__all__ = ["REFUSED_CATEGORIES", "text_problem", "first_refused", "problems"]

REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMES = {"Cc": "control character", "Cf": "format character", "Zl": "line separator",
          "Zp": "paragraph separator", "Cs": "lone surrogate"}


def first_refused(value: str) -> tuple[int, str, str] | None:
    """(0-based position, character, what it is) of the first refused character, or None."""
    if value.isascii() and value.isprintable():  # U+0020..U+007E: the common case, no search
        return None
    for i, ch in enumerate(value):
        cat = unicodedata.category(ch)
        if cat in REFUSED_CATEGORIES:
            return i, ch, _NAMES[cat]
    return None


def text_problem(value: str, limit: int, what: str, required: bool = True) -> str | None:
    """Why a free-text field is not acceptable, or None: required (unless not), at most `limit`
    characters, no refused character (module docstring). The reason names the character by code
    point and position, never echoes the value."""
    if not value:
        return f"required: {what}" if required else None
    if len(value) > limit:
        return f"{len(value)} characters, at most {limit}"
    bad = first_refused(value)
    if bad is not None:
        pos, ch, name = bad
        return f"{name} U+{ord(ch):04X} at position {pos + 1}"
    return None


def problems(fields) -> list[tuple[str, str]]:
    """(field, reason) for each field that breaks the rule; fields are (name, value, limit, required)
    with `what` taken as the field's name. The shape InvalidRequest and row errors take."""
    out = []
    for name, value, limit, required in fields:
        why = text_problem(value, limit, name, required)
        if why is not None:
            out.append((name, why))
    return out
