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
