"""Keyed pseudonyms of insured persons (参保人): the one place a raw insured id is turned into the
string the rest of tracecode stores, logs, exports and compares.

An insured person's id is personal information (`shared/spec/leads.md`, Insured persons). Every
component that meets a raw id (the settlement path, the leads engine, the ledger console's
search) calls `Pseudonymizer.pseudonym` on it first and keeps only the result, so one person has
one pseudonym everywhere in a deployment, and an inspector who knows the id can find the person
by computing it.

The pseudonym is HMAC-SHA256 under a deployment key, over the normalised id (insured.py: NFKC,
every space, format character and dash removed, letters upper-cased), written as the key's
id, a dot, and the first 32 hex digits (128 bits) of the MAC, e.g. `k1.9f86d081884c7d659a2feaa0c55ad015`.
The key id makes a rotation visible in the data: pseudonyms made under different keys never look
alike by accident (docs/security.md, "Insured pseudonyms").

Imports: the standard library and insured.py (the leads engine and the console use it without the server).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat

from .insured import normalise

__all__ = ["PseudonymKeyError", "Pseudonymizer", "normalise", "generate_key_file", "MIN_KEY_BYTES"]

MIN_KEY_BYTES = 32
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_PSEUDONYM = re.compile(r"^[A-Za-z0-9_-]{1,16}\.[0-9a-f]{32}$")


class PseudonymKeyError(ValueError):
    """The key file is missing, unreadable, too short or readable by others."""


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms under one key. Thread-safe: the key's two hash states are never
    updated, only copied (each MAC works on its copies)."""

    __slots__ = ("key_id", "_key", "_inner", "_outer")

    def __init__(self, key: bytes, key_id: str = "k1"):
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"pseudonym key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        if not _KEY_ID.match(key_id):
            raise PseudonymKeyError(f"pseudonym key id {key_id!r} must be 1-16 of [A-Za-z0-9_-]")
        self.key_id = key_id
        self._key = bytes(key)
        # HMAC (RFC 2104) with the key's padded blocks hashed once, here: a MAC is then a copy
        # of each state and one short update, about 2.4 times hmac.digest's speed, which pads
        # and hashes the key again for every id (tests/test_pseudonym.py holds it to hmac).
        block = hashlib.sha256(self._key).digest() if len(self._key) > 64 else self._key
        block = block.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def __reduce__(self):
        # Pickled as its key (to the leads engine's worker processes and Spark's executors): the
        # hash states are not picklable, and are made again from the key there.
        return (Pseudonymizer, (self._key, self.key_id))

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of data under the key (hmac.digest's bytes)."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def pseudonym(self, raw_id: str) -> str:
        """The pseudonym of a raw insured id; '' for an id that normalises to nothing. Callers
        that take ids from outside validate them first (insured.check); this only hashes."""
        norm = normalise(raw_id)
        if not norm:
            return ""
        return f"{self.key_id}.{self.mac(norm.encode('utf-8'))[:16].hex()}"

    __call__ = pseudonym

    def pseudonym_many(self, raw_ids) -> list[str]:
        """pseudonym() of each id, in order (the leads engine's columns): the same strings, with
        the per-call overhead paid once."""
        return self.pseudonym_many_normalised([normalise(raw) for raw in raw_ids])

    def pseudonym_many_normalised(self, norm_ids) -> list[str]:
        """pseudonym_many over ids that normalise() returned already (the leads engine's
        checked columns): the same strings, without normalising them twice."""
        prefix, inner0, outer0 = f"{self.key_id}.", self._inner, self._outer
        out: list[str] = []
        append = out.append
        for norm in norm_ids:
            if not norm:
                append("")
                continue
            inner = inner0.copy()  # mac(), inlined: this loop runs once per id of a national history
            inner.update(norm.encode("utf-8"))
            outer = outer0.copy()
            outer.update(inner.digest())
            append(prefix + outer.digest()[:16].hex())
        return out

    def fingerprint(self) -> str:
        """16 hex digits that tell this key from another (the data-set marker keeps them) and
        reveal nothing of it: an HMAC under the key of a fixed text."""
        return hmac.digest(self._key, b"tracecode data-set marker", "sha256")[:8].hex()

    @staticmethod
    def looks_like_pseudonym(value: str) -> bool:
        """True when a value has the shape of a pseudonym (for inputs that already carry them)."""
        return bool(_PSEUDONYM.match(value))

    @classmethod
    def from_file(cls, path: str) -> "Pseudonymizer":
        """Load a key file: one line `KEY_ID:HEX` (at least 32 bytes of key), mode 0600 or
        stricter, because whoever reads the key can test guesses of ids against pseudonyms."""
        try:
            st = os.stat(path)
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError as exc:
            raise PseudonymKeyError(f"pseudonym key file {path}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PseudonymKeyError(f"pseudonym key file {path} is readable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        key_id, sep, hexkey = text.partition(":")
        if not sep:
            raise PseudonymKeyError(f"pseudonym key file {path}: expected one line KEY_ID:HEX")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            raise PseudonymKeyError(f"pseudonym key file {path}: the key is not hex") from None
        return cls(key, key_id)


def generate_key_file(path: str, key_id: str = "k1") -> str:
    """Write a new random key file (mode 0600, never overwriting one) and return its path."""
    if not _KEY_ID.match(key_id):
        raise PseudonymKeyError(f"pseudonym key id {key_id!r} must be 1-16 of [A-Za-z0-9_-]")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(f"{key_id}:{secrets.token_hex(MIN_KEY_BYTES)}\n")
    return path
