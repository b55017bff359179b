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
    """HMAC-SHA256 pseudonyms under one key. Thread-safe (no mutable state)."""

    __slots__ = ("key_id", "_key")

    def __init__(self, key: bytes, key_id: str = "k1"):
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymKeyError(f"pseudonym key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        if not _KEY_ID.match(key_id):
            raise PseudonymKeyError(f"pseudonym key id {key_id!r} must be 1-16 of [A-Za-z0-9_-]")
        self.key_id = key_id
        self._key = bytes(key)

    def pseudonym(self, raw_id: str) -> str:
        """The pseudonym of a raw insured id; '' for an id that normalises to nothing. Callers
        that take ids from outside validate them first (insured.check); this only hashes."""
        norm = normalise(raw_id)
        if not norm:
            return ""
        # hmac.digest: the one-shot C path (no HMAC object per id).
        return f"{self.key_id}.{hmac.digest(self._key, norm.encode('utf-8'), 'sha256')[:16].hex()}"

    __call__ = pseudonym

    def pseudonym_many(self, raw_ids) -> list[str]:
        """pseudonym() of each id, in order (the leads engine's columns): the same strings, with
        the per-call overhead paid once."""
        key, prefix, digest, norm_of = self._key, f"{self.key_id}.", hmac.digest, normalise
        out = []
        for raw in raw_ids:
            norm = norm_of(raw)
            out.append(prefix + digest(key, norm.encode("utf-8"), "sha256")[:16].hex() if norm else "")
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
