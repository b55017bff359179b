"""The data-set marker: what a data set in Redis was written with, checked by every process before
it touches the data (`Store.open_dataset`).

A data set's keys and values are only meaningful under the settings they were written with: the
key layout's version, BUCKETS (the hash tags), code_buckets (the hashes per tag) and the insured
pseudonym key (a pseudonym made under another key names nobody). Each of these, changed under a
data set that exists, would make every code UNKNOWN, every pack sellable again, or every card
suspension miss, and nothing would say so. So the first server to start on an empty data set
writes them into one key (`{prefix}:dataset`, JSON, SET NX: two first servers agree on one), and
every server, bulk job and pruning run compares its own with the marker before anything else; a
difference refuses to start with a message naming the field and both values. A change of layout
brings its migration with it, which rewrites the marker.

The pseudonym key is represented by its id and a fingerprint (an HMAC under the key of a fixed
text, rules/pseudonym.py): it tells keys apart without revealing anything of the key. A process
without the key (a pruning run with no key file configured) does not compare those two fields.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import DataSetMismatch
from .keys import BUCKETS, LAYOUT

__all__ = ["DataSetMarker", "COMPARED"]

# The fields that must match; the others (when, by which version) are kept for the operator.
COMPARED = ("layout", "buckets", "code_buckets", "key_id", "key_fingerprint")


@dataclass(frozen=True, slots=True)
class DataSetMarker:
    code_buckets: int
    key_id: str = ""  # '' when the process holds no pseudonym key: not compared
    key_fingerprint: str = ""
    layout: int = LAYOUT
    buckets: int = BUCKETS
    written_by: str = ""  # the tracecode version that wrote it (informational)

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, text: str, where: str) -> "DataSetMarker":
        try:
            doc = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise DataSetMismatch(f"the data-set marker {where} is unreadable ({exc}): not a tracecode data set, "
                                  "or one damaged by hand") from None

    def differences(self, stored: "DataSetMarker") -> list[tuple[str, object, object]]:
        """(field, the data set's value, this process's value) for each compared field that differs;
        key fields this process does not know ('') are not compared."""
        out = []
        for name in COMPARED:
            mine, theirs = getattr(self, name), getattr(stored, name)
            if name.startswith("key_") and not mine:
                continue
            if mine != theirs:
                out.append((name, theirs, mine))
        return out

    def check(self, stored: "DataSetMarker", where: str) -> None:
        """DataSetMismatch naming every differing field and both of its values."""
        diff = self.differences(stored)
        if diff:
            said = "; ".join(f"{name} is {theirs!r} in the data set, {mine!r} here" for name, theirs, mine in diff)
            raise DataSetMismatch(f"the data set {where} was written with other settings: {said}. Start with the "
                                  "data set's settings (or another key prefix); changing them needs a migration")
