"""Redis key layout. Only the store uses it; nothing else needs to know how keys are spelled.

Every key of one code carries the same hash tag, so on Redis Cluster a code's record, state and
history sit in one slot and a Lua call can touch them atomically. The tag is a *bucket* (crc32 of
the canonical code, modulo BUCKETS) rather than the code itself, so that the audit stream of a
bucket lives in the same slot as the codes it logs and the number of audit streams stays bounded
(BUCKETS of them) for readers that tail them all.

Codes are grouped into bucket hashes, ~200-400 codes each (Redis keeps a hash that small as one
listpack, a few bytes of overhead per field instead of ~90 per key; docs/scaling.md):

    {p}:{bbbb}:c:{k}             hash    code -> entry (layout.ENTRY_FIELDS packed): issuance lot id
                                         and status, and the dispense state, in ONE field; the
                                         field name is the code packed (rules/packing.py), and so
                                         are the entry's time and buyer. No batch index: a recall
                                         scans a tag's buckets for the batch's lot ids (batch.lua)
    {p}:{bbbb}:L                 hash    lot id -> lot (product, gtin, batch, expiry, pack units,
                                         manufacturer): what many codes share, stored once per tag;
                                         ids are small numbers in the order the tag met its lots
                                         ('#' counts them, '=<sha1 prefix>' finds a lot's id)
    {p}:{bbbb}:h:{code}          list    the code's events beyond its first dispense (created only
                                         when there are such events: attempts, returns, status changes)
    {p}:{bbbb}:audit             stream  every state change and flagged attempt of the bucket's calls
    {p}:{bbbb}:s:{n}:{site}:{sid} hash   a settlement: body digest, stored results, line ledger
                                         (its codes packed), its time packed; its site and id are
                                         the key's own (lua/_state.lua record_owner reads them)
    {p}:{bbbb}:sp:{n}:{site}:{sid} hash  cluster only: the lines of a settlement in this slot
    {p}:{bbbb}:r:{n}:{site}:{did} hash   a delivery's receiving check (receive.lua): digest, answer
                                         (on a cluster: the claim of its body, then one
    {p}:{bbbb}:rp:{n}:{site}:{did} hash  record per slot of its lines)
    {p}:dataset                  string  the data-set marker (store/marker.py): layout version,
                                         BUCKETS, code_buckets, pseudonym key id and fingerprint

k = (crc32(code) >> 10) mod code_buckets: the hash within the tag (the tag takes the low 10 bits).
BUCKETS and code_buckets are fixed for the life of a data set (changing either moves every key);
the marker refuses a server, job or prune run configured otherwise.

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

from tracecode.rules.schema import BUCKETS, TAGS, audit_stream

# The version of the layout above: the data-set marker carries it and refuses a data set of
# another. 3: the packed national layout (issue 29, docs/scaling.md); 4: its settlement records
# packed too (results and ledger with their defaults as nothing, layout.py). Nothing is released,
# so no migration exists: a data set of an earlier layout is refused by name.
LAYOUT = 4
# Hashes per tag. The default suits up to ~25 million codes (1024 x 64 hashes of ~400);
# a national data set sets it from its size (docs/scaling.md: codes / 1024 / 300).
DEFAULT_CODE_BUCKETS = 64
MAX_CODE_BUCKETS = 1 << 22

_TAGS = TAGS
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

    __slots__ = ("prefix", "code_buckets")

    def __init__(self, prefix: str = "tc", *, code_buckets: int = DEFAULT_CODE_BUCKETS):
        if not prefix or any(c in prefix for c in "{}: "):
            raise ValueError(f"key prefix {prefix!r}: must be non-empty without braces, colons or spaces")
        if not 1 <= code_buckets <= MAX_CODE_BUCKETS:
            raise ValueError(f"code_buckets {code_buckets!r}: must be 1..{MAX_CODE_BUCKETS}")
        self.prefix = prefix
        self.code_buckets = code_buckets

    def job(self, prefix: str) -> "KeySpace":
        """A bulk job's namespace beside this one: same buckets, its own prefix."""
        return KeySpace(prefix, code_buckets=self.code_buckets)

    def code_keys(self, code: str, state: "KeySpace | None" = None) -> tuple[str, ...]:
        """The keys of one canonical code that the scripts take, in their order. With `state` (a
        bulk job's namespace) the dispense state and history are that namespace's.

        (issuance bucket, lot dictionary, state bucket, history); the two buckets are one key in
        the live namespace, where the entry holds issuance and state."""
        h = crc32(code.encode())
        t = _TAGS[h & (BUCKETS - 1)]
        p = self.prefix
        q = state.prefix if state is not None else p
        k = (h >> 10) % self.code_buckets
        return f"{p}:{t}:c:{k}", f"{p}:{t}:L", f"{q}:{t}:c:{k}", f"{q}:{t}:h:{code}"

    def buckets(self) -> list[tuple[str, str]]:
        """Every bucket hash with its tag's lot dictionary (what a walk over all codes reads)."""
        p = self.prefix
        return [(f"{p}:{t}:c:{k}", f"{p}:{t}:L") for t in _TAGS for k in range(self.code_buckets)]

    def history(self, code: str) -> str:
        """A code's history list."""
        return self.code_keys(code)[-1]

    def issuance(self, code: str) -> str:
        """The key holding a code's issuance record: its bucket hash."""
        return self.code_keys(code)[0]

    def settlement(self, site: str, settlement_id: str) -> str:
        # The site's length keeps "a:b"+"c" and "a"+"b:c" apart.
        name = f"{len(site)}:{site}:{settlement_id}"
        return f"{self.prefix}:{tag_of(name)}:s:{name}"

    def settlement_part(self, site: str, settlement_id: str, code: str) -> str:
        """On a cluster, the record of the lines of a settlement whose codes share `code`'s slot."""
        return f"{self.prefix}:{tag_of(code)}:sp:{len(site)}:{site}:{settlement_id}"

    def delivery(self, site: str, delivery_id: str) -> str:
        """A delivery's record (receive.lua; on a cluster its claim, store.receive)."""
        name = f"{len(site)}:{site}:{delivery_id}"
        return f"{self.prefix}:{tag_of(name)}:r:{name}"

    def delivery_part(self, site: str, delivery_id: str, code: str) -> str:
        """On a cluster, the record of a delivery's lines whose codes share `code`'s slot."""
        return f"{self.prefix}:{tag_of(code)}:rp:{len(site)}:{site}:{delivery_id}"

    def audit_for(self, key: str) -> str:
        """The audit stream in the same slot as `key` (any key built by this class)."""
        return f"{self.prefix}:{_tag_in(key)}:audit"

    def registry_for(self, key: str) -> str:
        """A bulk job namespace's registry of the keys it wrote, in the same slot as `key`."""
        return f"{self.prefix}:{_tag_in(key)}:reg"

    def registries(self) -> list[str]:
        """Every registry of this (job) namespace, one per bucket."""
        return [f"{self.prefix}:{t}:reg" for t in _TAGS]

    def audit_streams(self) -> list[str]:
        return [audit_stream(self.prefix, b) for b in range(BUCKETS)]

    def marker(self) -> str:
        """The data-set marker (store/marker.py)."""
        return f"{self.prefix}:dataset"

    def sanction(self, name: str) -> str:
        """A sanction key (see the module docstring): name is all, rq, log, site:<id> or ins:<pseudonym>."""
        return f"{self.prefix}:{SANCTION_TAG}:x:{name}"

    def sanction_audit(self) -> str:
        return f"{self.prefix}:{SANCTION_TAG}:audit"


SANCTION_TAG = tag_of("sanctions")
