"""Valid test codes and issuance rows, built from the codec's own check-digit rule."""
from __future__ import annotations

import itertools

from tracecode import codec
from tracecode.clients.files import Row

_serials = itertools.count(1)


def cn20(product7: str = "8123456") -> str:
    n = next(_serials)
    return f"{product7}{n:09d}{(n * 7919) % 10000:04d}"


def gtin14(base13: str = "0690123456789") -> str:
    return base13 + str(codec.gtin_check_digit(base13))


def gs1(gtin: str | None = None, serial: str | None = None, expiry: str = "", batch: str = "") -> str:
    """Parenthesised GS1 element string of one pack."""
    gtin = gtin or gtin14()
    serial = serial or f"S{next(_serials):08d}"
    return f"(01){gtin}" + (f"(17){expiry}" if expiry else "") + (f"(10){batch}" if batch else "") + f"(21){serial}"


def issuance(code: str, product_id: str, **fields) -> Row:
    f = {"code": code, "product_id": product_id}
    f.update({k: str(v) for k, v in fields.items()})
    return Row("test", 0, f)


def load(admin, *rows: Row, replace: bool = False):
    resp = admin.upsert(rows, replace=replace, source="test")
    assert resp.rejected == 0, list(resp.errors)
    return resp
