-- archive_commit.lua: the archiver has written a stream's entries up to ARGV[2] into the archive
-- (files renamed into place); acknowledge them, move the stream's archived watermark and trim the
-- stream behind it, in one step (server/store/archive.py). Idempotent: a repeated commit (the
-- reply was lost) acknowledges nothing new and counts nothing twice.
--
-- KEYS[1] the audit stream   KEYS[2] its archive hash (w watermark, m the first ID past it,
--                                     n entries archived, d entries dropped by the bound, f intent)
-- ARGV[1] the archiver's group  ARGV[2] the last ID written  ARGV[3] the first ID past it
-- ARGV[4] entries written  ARGV[5...] the IDs to acknowledge
-- Returns the number of entries trimmed from the stream.

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function before(a, b)  -- stream ID a < b
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

local function next_id(id)
  local ms, seq = id_parts(id)
  return string.format('%d-%d', ms, seq + 1)
end

if #ARGV > 4 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 5)) end
local w = redis.call('HGET', KEYS[2], 'w')
if not w or before(w, ARGV[2]) then
  redis.call('HSET', KEYS[2], 'w', ARGV[2], 'm', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 'n', ARGV[4])
end
redis.call('HDEL', KEYS[2], 'f')

-- Trim at the watermark, but not past what another group (the ledger console's) has still to
-- read or acknowledge: it keeps the stream longer, up to the hard bound (lua/_audit.lua).
local minid = redis.call('HGET', KEYS[2], 'm')
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] ~= ARGV[1] then
    local unread = next_id(info['last-delivered-id'])
    if before(unread, minid) then minid = unread end
    local p = redis.call('XPENDING', KEYS[1], info['name'])
    if tonumber(p[1]) > 0 and before(p[2], minid) then minid = p[2] end
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
