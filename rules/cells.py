"""Spreadsheet cells the project writes (CSV and XLSX): a text cell that a spreadsheet would take
for a formula is neutralised as OWASP's CSV-injection rule says, by a leading apostrophe.

A cell is neutralised when it is text (numbers are written as numbers and left alone) and starts
with `=`, `+`, `-`, `@`, a tab or a carriage return: `=HYPERLINK("http://evil.example/","x")` in a
batch number or a site's region would otherwise become a live link in the inspector's copy of the
weekly report. Every writer of CSV or XLSX passes its text cells through `neutralise` (or a row
through `neutralise_row`).

Imports: the standard library only.
"""
from __future__ import annotations

from typing import Any, Iterable

__all__ = ["FORMULA_STARTS", "neutralise", "neutralise_row", "restore"]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> Any:
    """The cell as written: text starting like a formula gets a leading apostrophe; anything else as is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def restore(value: str) -> str:
    """A text cell as it was before neutralise(): what a reader of the project's own CSV and XLSX
    files (the console's intake of leads.csv) applies. A value that itself began with an
    apostrophe and a formula character loses that apostrophe: the price of a reversible rule."""
    if value[:1] == "'" and value[1:2] and value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value


def neutralise_row(row: Iterable[Any]) -> list[Any]:
    """neutralise() over a row of cells."""
    return [neutralise(v) for v in row]
