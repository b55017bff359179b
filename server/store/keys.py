"""Redis key layout. Only the store uses it; nothing else needs to know how keys are spelled.

Two data layouts exist (KeySpace.layout). Layout 2 is the one deployments run; layout 1 is kept
runnable (lua/v1/) for the migration from it (`tracecode migrate-layout`) and for the side-by-side
memory benchmark. What differs is how a code's state is kept; settlement records, audit streams,
batch index and sanctions are spelled the same in both.

Layout 2: codes grouped into bucket hashes, ~200-400 codes each (Redis keeps a hash that small as
one listpack, a few bytes of overhead per field instead of ~90 per key; docs/scaling.md):

    {p}:{bbbb}:c:{k}             hash    code -> entry (layout.ENTRY_FIELDS packed): issuance lot id
                                         and status, and the dispense state, in ONE field
    {p}:{bbbb}:L                 hash    lot id -> lot (product, gtin, batch, expiry, pack units,
                                         manufacturer): what many codes share, stored once per tag
    {p}:{bbbb}:h:{code}          list    the code's events beyond its first dispense (created only
                                         when there are such events: attempts, returns, status changes)
    {p}:{bbbb}:B:{n}:{product}:{batch}  hash  the codes of a batch that live in this tag -> '' (for
                                         recalls; written with the code's record in one call. A hash,
                                         not a set: Redis 7.0 keeps small sets of strings only as
                                         hashtables, ~70 bytes a member; n = len(product))

k = (crc32(code) >> 10) mod code_buckets: the hash within the tag (the tag takes the low 10 bits).
code_buckets is fixed for the life of a data set, like BUCKETS.

Layout 1 (one to three keys per code):

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
    {p}:{bbbb}:b:{product}:{batch} set   codes of a batch (for recalls; tagged by the batch)

BUCKETS is fixed for the life of a data set: changing it moves every key.

Sanctions (store/sanctions.py) share the tag of one bucket (SANCTION_TAG), so their script writes
them, the change stream and that bucket's audit stream in one atomic call on a cluster too:

    {p}:{T}:x:all                hash    every sanction entry ever, id -> json (lifted ones too)
    {p}:{T}:x:rq                 hash    SetSanction request id -> sanction id (idempotency)
    {p}:{T}:x:site:{site}        hash    a site's entries not lifted, id -> json (gate.lua reads it)
    {p}:{T}:x:ins:{pseudonym}    hash    the same for an insured person
    {p}:{T}:x:log                stream  every change (entry json), read by each server's view
"""
from zlib import crc32

from redis.crc import key_slot

BUCKETS = 1024
LAYOUTS = (1, 2)
# Hashes per tag (layout 2). The default suits up to ~25 million codes (1024 x 64 hashes of ~400);
# a national data set sets it from its size (docs/scaling.md: codes / 1024 / 300).
DEFAULT_CODE_BUCKETS = 64
MAX_CODE_BUCKETS = 1 << 22

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

    __slots__ = ("prefix", "layout", "code_buckets")

    def __init__(self, prefix: str = "tc", *, layout: int = 2, code_buckets: int = DEFAULT_CODE_BUCKETS):
        if not prefix or any(c in prefix for c in "{}: "):
            raise ValueError(f"key prefix {prefix!r}: must be non-empty without braces, colons or spaces")
        if layout not in LAYOUTS:
            raise ValueError(f"store layout {layout!r}: must be one of {', '.join(map(str, LAYOUTS))}")
        if not 1 <= code_buckets <= MAX_CODE_BUCKETS:
            raise ValueError(f"code_buckets {code_buckets!r}: must be 1..{MAX_CODE_BUCKETS}")
        self.prefix = prefix
        self.layout = layout
        self.code_buckets = code_buckets

    def job(self, prefix: str) -> "KeySpace":
        """A bulk job's namespace beside this one: same layout and buckets, its own prefix."""
        return KeySpace(prefix, layout=self.layout, code_buckets=self.code_buckets)

    def code_keys(self, code: str, state: "KeySpace | None" = None) -> tuple[str, ...]:
        """The keys of one canonical code that the scripts take, in their order. With `state` (a
        bulk job's namespace) the dispense state and history are that namespace's.

        layout 2: (issuance bucket, lot dictionary, state bucket, history); the two buckets are
                  one key in the live namespace, where the entry holds issuance and state.
        layout 1: (issuance, dispense, history)."""
        h = crc32(code.encode())
        t = _TAGS[h & (BUCKETS - 1)]
        p = self.prefix
        q = state.prefix if state is not None else p
        if self.layout == 1:
            return f"{p}:{t}:i:{code}", f"{q}:{t}:d:{code}", f"{q}:{t}:h:{code}"
        k = (h >> 10) % self.code_buckets
        return f"{p}:{t}:c:{k}", f"{p}:{t}:L", f"{q}:{t}:c:{k}", f"{q}:{t}:h:{code}"

    def buckets(self) -> list[tuple[str, str]]:
        """Layout 2: every bucket hash with its tag's lot dictionary (what a walk over all codes reads)."""
        p = self.prefix
        return [(f"{p}:{t}:c:{k}", f"{p}:{t}:L") for t in _TAGS for k in range(self.code_buckets)]

    def history(self, code: str) -> str:
        """A code's history list (both layouts)."""
        return self.code_keys(code)[-1]

    def issuance(self, code: str) -> str:
        """The key holding a code's issuance record (layout 2: its bucket hash)."""
        return self.code_keys(code)[0]

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
        """Layout 1: the one set of a batch's codes."""
        return f"{self.prefix}:{tag_of(product + chr(0) + batch)}:b:{product}:{batch}"

    def batch_part(self, product: str, batch: str, code: str) -> str:
        """Layout 2: the index of a batch's codes in `code`'s tag."""
        return f"{self.prefix}:{tag_of(code)}:B:{len(product)}:{product}:{batch}"

    def batch_parts(self, product: str, batch: str) -> list[str]:
        """Layout 2: every tag's index of a batch (what a recall reads)."""
        return [f"{self.prefix}:{t}:B:{len(product)}:{product}:{batch}" for t in _TAGS]

    def audit_streams(self) -> list[str]:
        return [f"{self.prefix}:{t}:audit" for t in _TAGS]

    def sanction(self, name: str) -> str:
        """A sanction key (see the module docstring): name is all, rq, log, site:<id> or ins:<pseudonym>."""
        return f"{self.prefix}:{SANCTION_TAG}:x:{name}"

    def sanction_audit(self) -> str:
        return f"{self.prefix}:{SANCTION_TAG}:audit"


SANCTION_TAG = tag_of("sanctions")
