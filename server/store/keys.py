"""Redis key layout. Only the store uses it; nothing else needs to know how keys are spelled.

Every key of one code carries the same hash tag, so on Redis Cluster a code's issuance record,
dispense state and history sit in one slot and a Lua call can touch them atomically. The tag is a
*bucket* (crc32 of the canonical code, modulo BUCKETS) rather than the code itself, so that the
audit stream of a bucket (`{prefix}:{bucket}:audit`) lives in the same slot as the codes it logs
and the number of audit streams stays bounded (BUCKETS of them) for readers that tail them all.

    {p}:{bbbb}:i:{code}          hash    issuance record (product, gtin, batch, expiry, units, status ...)
    {p}:{bbbb}:d:{code}          hash    dispense state (units used, first dispense, attempts, events)
    {p}:{bbbb}:h:{code}          list    the code's events, JSON, newest last, capped
    {p}:{bbbb}:audit             stream  every state change and flagged attempt of the bucket's calls
    {p}:{bbbb}:s:{n}:{site}:{sid} hash    a settlement: body digest, stored results, line ledger
    {p}:{bbbb}:sp:{n}:{site}:{sid} hash  cluster only: the lines of a settlement in this slot
    {p}:{bbbb}:b:{product}:{batch} set   codes of a batch (for recalls)

BUCKETS is fixed for the life of a data set: changing it moves every key.
"""
from zlib import crc32

from redis.crc import key_slot

BUCKETS = 1024

_TAGS = tuple("{%04d}" % b for b in range(BUCKETS))
# The Redis Cluster slot of each bucket (CRC16 of the tag's inside, as Redis computes it).
_SLOTS = tuple(key_slot(t.encode()) for t in _TAGS)


def _bucket(text: str) -> int:
    return crc32(text.encode()) & (BUCKETS - 1)


def tag_of(text: str) -> str:
    """The hash tag of the bucket that owns `text` (a canonical code or a settlement name)."""
    return _TAGS[_bucket(text)]


def _tag_in(key: str) -> str:
    """The hash tag of a key built by KeySpace."""
    start = key.index("{")
    return key[start:key.index("}", start) + 1]


def slot_of(text: str) -> int:
    """The cluster slot every key of `text` (a canonical code) lives in."""
    return _SLOTS[_bucket(text)]


class KeySpace:
    """Key names under one prefix. A bulk REPLAY job uses its own prefix for dispense state
    while reading issuance from the live one (same tags, so the same slots)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "tc"):
        if not prefix or any(c in prefix for c in "{}: "):
            raise ValueError(f"key prefix {prefix!r}: must be non-empty without braces, colons or spaces")
        self.prefix = prefix

    def code_keys(self, code: str, state: "KeySpace | None" = None) -> tuple[str, str, str]:
        """(issuance, dispense, history) keys of one canonical code; with `state` (a bulk job's
        namespace) the dispense and history keys are that namespace's."""
        t = tag_of(code)
        p = self.prefix
        q = state.prefix if state is not None else p
        return f"{p}:{t}:i:{code}", f"{q}:{t}:d:{code}", f"{q}:{t}:h:{code}"

    def issuance(self, code: str) -> str:
        return f"{self.prefix}:{tag_of(code)}:i:{code}"

    def settlement(self, site: str, settlement_id: str) -> str:
        # The site's length keeps "a:b"+"c" and "a"+"b:c" apart.
        name = f"{len(site)}:{site}:{settlement_id}"
        return f"{self.prefix}:{tag_of(name)}:s:{name}"

    def settlement_part(self, site: str, settlement_id: str, code: str) -> str:
        """On a cluster, the record of the lines of a settlement whose codes share `code`'s slot."""
        return f"{self.prefix}:{tag_of(code)}:sp:{len(site)}:{site}:{settlement_id}"

    def audit_for(self, key: str) -> str:
        """The audit stream in the same slot as `key` (any key built by this class)."""
        return f"{self.prefix}:{_tag_in(key)}:audit"

    def registry_for(self, key: str) -> str:
        """A bulk job namespace's registry of the keys it wrote, in the same slot as `key`."""
        return f"{self.prefix}:{_tag_in(key)}:reg"

    def registries(self) -> list[str]:
        """Every registry of this (job) namespace, one per bucket."""
        return [f"{self.prefix}:{t}:reg" for t in _TAGS]

    def batch(self, product: str, batch: str) -> str:
        return f"{self.prefix}:{tag_of(product + chr(0) + batch)}:b:{product}:{batch}"

    def audit_streams(self) -> list[str]:
        return [f"{self.prefix}:{t}:audit" for t in _TAGS]
