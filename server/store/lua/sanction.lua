-- sanction.lua: impose ('S') or lift ('L') one sanction, atomically with its indexes, the change
-- stream every server's view reads, and the audit stream (all keys share one hash tag: one slot).
--
-- KEYS[1] every entry (hash id -> entry json)      KEYS[2] request ids (hash request_id -> id)
-- KEYS[3] the subject's index (hash id -> entry json of the entries not lifted; gate.lua reads it)
-- KEYS[4] change stream (field e = entry json)      KEYS[5] audit stream of the slot
-- 'S': ARGV[2] request id  ARGV[3] sanction id  ARGV[4] body digest  ARGV[5] entry json
-- 'L': ARGV[2] sanction id  ARGV[3] the entry json as the caller read it  ARGV[4] the lifted entry json
-- then for both: ARGV[6] now ms  ARGV[7] audit max  ARGV[8] change stream max
--   and the audit fields: ARGV[9] kind  ARGV[10] site ('' for a person)  ARGV[11] pseudonym ('' for a site)
--   ARGV[12] reason  ARGV[13] reference  ARGV[14] actor
-- Returns {changed 0|1, entry json}. Errors: TCCONFLICT (request id used with another body),
-- TCNOTFOUND (no such sanction), TCRETRY (the entry changed since the caller read it).
-- Entries are written as given (json made by sanctions.Sanction.to_json): Lua's cjson would
-- print large millisecond times with limited precision, so this script never encodes one.
--@AUDIT@--

local op = ARGV[1]
local now, audit_max, log_max = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local function changed(entry, etype)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', log_max, '*', 'e', entry)
  audit_add(KEYS[5], audit_max, 't', etype, 'n', cjson.decode(entry).id,
             'k', ARGV[9], 's', ARGV[10], 'p', ARGV[11], 'x', ARGV[12], 'r', ARGV[13], 'b', ARGV[14], 'a', now)
end

if op == 'S' then
  local id = redis.call('HGET', KEYS[2], ARGV[2])
  if id then
    local entry = redis.call('HGET', KEYS[1], id)
    if cjson.decode(entry).d == ARGV[4] then return {0, entry} end
    return redis.error_reply('TCCONFLICT request_id already used with a different request body')
  end
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[5])
  -- The subject's index holds what may still bind: entries whose end has passed leave it here.
  local index = redis.call('HGETALL', KEYS[3])
  for i = 1, #index, 2 do
    local u = cjson.decode(index[i + 1]).u
    if u > 0 and u <= now then redis.call('HDEL', KEYS[3], index[i]) end
  end
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
  changed(ARGV[5], 'SANCTION_SET')
  return {1, ARGV[5]}
end

-- 'L'
local current = redis.call('HGET', KEYS[1], ARGV[2])
if not current then return redis.error_reply('TCNOTFOUND no sanction ' .. ARGV[2]) end
if current ~= ARGV[3] then return redis.error_reply('TCRETRY the sanction changed meanwhile') end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[2])
changed(ARGV[4], 'SANCTION_LIFTED')
return {1, ARGV[4]}
