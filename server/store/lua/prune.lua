-- prune.lua: drop the state of packs that can no longer matter: expired before the
-- cutoff day (the caller passes today minus the return window, so no return of theirs is still
-- possible and a scan would be refused EXPIRED anyway). Such a code's entry and history go; a
-- later scan of it is UNKNOWN, refused as well. Its evidence stays where it was also written: the
-- audit stream and the settlement history the leads engine reads.
--
-- KEYS[1] the bucket   KEYS[2] the tag's lot dictionary   then one per candidate: its history
-- ARGV[1] cutoff day (YYYYMMDD): a pack expiring before it is pruned   then the candidate codes
-- The caller picks candidates from a read of the bucket; each is judged again here, atomically
-- (an upsert since may have moved it to a later expiry). Codes with no expiry are never pruned,
-- nor packs that hold a live two-phase reservation.
-- Returns the codes pruned.
--@LAYOUT@--
--@STATE@--

local cutoff = tonumber(ARGV[1])
local pruned = {}
for j = 2, #ARGV do
  local code = ARGV[j]
  local e = entry_read(KEYS[1], code)
  local r = e and issuance_of(KEYS[2], e)
  if r and r.e > 0 and r.e < cutoff and (not e[E.rv] or e[E.rv] == '') then
    redis.call('HDEL', KEYS[1], cfield(code))
    redis.call('DEL', KEYS[j + 1])
    pruned[#pruned + 1] = code
  end
end
return pruned
