-- claim.lua: on a cluster, tie a settlement id to its request body before its parts are judged.
--
-- KEYS[1] the settlement's own record (its index on a cluster: digest, part record keys).
-- KEYS[2] in a bulk job's namespace only: the job's registry in KEYS[1]'s slot (see verify.lua).
-- ARGV[1] body digest   ARGV[2] part record keys (json)   ARGV[3] site   ARGV[4] settlement id
-- ARGV[5] settled_at ms   ARGV[6] ttl seconds
-- Returns {1, decision} when the id is (now) this body's, {0, ''} when it was used with another
-- body (nothing written: the first body's record stays as it was). decision is the two-phase
-- outcome decide.lua recorded for an earlier attempt ('K' or 'X'), or '' when none was.
local d = redis.call('HMGET', KEYS[1], 'd', 'dc')
if d[1] then return d[1] == ARGV[1] and {1, d[2] or ''} or {0, ''} end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'parts', ARGV[2], 'site', ARGV[3], 'i', ARGV[4], 'at', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
if KEYS[2] then
  redis.call('SADD', KEYS[2], KEYS[1])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
return {1, ''}
