-- decide.lua: record the outcome of a two-phase (cluster ALL_OR_NOTHING) settlement, once.
--
-- KEYS[1] the settlement's own record (written by claim.lua)   ARGV[1] 'K' commit or 'X' abort
-- Returns the decision that stands: the first one recorded wins, so two coordinators of the
-- same settlement (a slow one and a retry on another server) apply the same decision to every
-- part. A retry that finds a decision applies it instead of judging the parts again.
local d = redis.call('HGET', KEYS[1], 'dc')
if d then return d end
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('TCNOTFOUND settlement not claimed') end
redis.call('HSET', KEYS[1], 'dc', ARGV[1])
return ARGV[1]
