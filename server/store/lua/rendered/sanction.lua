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
-- audit_add(stream, limit, field, value, ...): append one audit entry (spliced into every script
-- that writes one, store.script_text). `limit` is the caller's audit_max argument:
--   limit > 0   no archive: the stream is kept near `limit` entries (MAXLEN ~), older ones lost.
--   limit < 0   an archiver runs (tracecode archive): it trims the stream itself at its archived
--               watermark (MINID, archive_commit.lua), so nothing unarchived goes. Only past the
--               hard bound -limit, kept to protect Redis memory when the archiver stops, are
--               entries dropped here: the archived ones first, then the oldest unarchived, whose
--               count and ID range go to the stream's archive hash for the archiver to count,
--               alert on and log (server/store/archive.py).
-- The archive hash '<stream>:archive' and the list '<stream>:drops' share the stream's hash tag
-- (same slot); their names are derived here rather than passed in KEYS so every caller keeps its
-- key list.
local function audit_add(stream, limit, ...)
  limit = tonumber(limit)
  if limit >= 0 then return redis.call('XADD', stream, 'MAXLEN', '~', limit, '*', ...) end
  local id = redis.call('XADD', stream, '*', ...)
  local bound = -limit
  if redis.call('XLEN', stream) <= bound then return id end
  local state = stream .. ':archive'
  local m = redis.call('HGET', state, 'm')  -- the first ID past the archived watermark
  if m then redis.call('XTRIM', stream, 'MINID', m) end
  local len = redis.call('XLEN', stream)
  if len <= bound then return id end
  -- Trim well below the bound (1/16 of it) so a stalled archiver costs one trim per many entries.
  local keep = bound - math.floor(bound / 16)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
  local dropped = redis.call('XTRIM', stream, 'MAXLEN', keep)
  local after = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
  redis.call('HINCRBY', state, 'd', dropped)
  -- The dropped range [first, after), for the archiver's log (the newest 1000 ranges kept).
  redis.call('RPUSH', stream .. ':drops', first .. ' ' .. after .. ' ' .. dropped)
  redis.call('LTRIM', stream .. ':drops', -1000, -1)
  return id
end


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
