"""The store: the only code that speaks Redis (redis-py and hiredis are imported here and nowhere
else; import-linter checks it, pyproject.toml).

It holds the connections and pipelines, the routing of calls to cluster slots and the two-phase
commit of settlements that span slots, the translation of Redis errors into the domain errors of
`tracecode.server.errors`, the key layout (`keys`), the Lua scripts every verdict depends on
(`lua/`, each one atomic call), and the embedded redis-server `tracecode serve` supervises
(`embedded`), the data-set marker (`marker`), the pruning of packs past expiry (`prune`) and the
consumer-group readers of the audit streams behind the AuditFeed service (`audit`). Its
seams are typed: it takes `SettlementCall`s and answers with `SettlementResult`s of named
`ScriptRow`s, `StoredSettlement`s and `Reversal`s (`types`).

May import: the standard library, redis, hiredis, and the plain modules of tracecode.server
(errors, verdicts, failpoints). Never grpc, the generated stubs, or the API package.
"""
# The audit feed's reader (issue 24: the console reads no Redis of its own).
from .audit import AuditEntry, AuditReader, Follower, GroupStatus
from .embedded import DataDirInUse, EmbeddedRedis, RedisProcess, free_port
from .keys import BUCKETS, KeySpace, slot_of
from .marker import DataSetMarker
from .prune import PruneSummary, prune_expired
from .store import PreparedBatch, Store, StoreLimits, now_ms

__all__ = ["AuditEntry", "AuditReader", "BUCKETS", "Follower", "GroupStatus",
           "DataDirInUse", "DataSetMarker", "EmbeddedRedis", "KeySpace", "PreparedBatch", "PruneSummary",
           "RedisProcess", "Store", "StoreLimits", "free_port", "now_ms", "prune_expired", "slot_of"]
