-- issue.lua: upsert issuance records, atomically per call (one call carries many records).
--
-- KEYS: two per record: its issuance key and its dispense state key (same slot).
-- ARGV[1] replace ('1' overwrites a record issued for another product), then 7 per record:
--   product, gtin, batch, expiry (YYYYMMDD or 0), pack units, manufacturer, status ('' = keep the
--   stored status, ACTIVE for a new record; a reload must not undo a recall).
-- Returns one outcome per record: 0 unchanged, 1 created, 2 updated, 3 conflict (kept the stored),
-- 4 rejected: fewer pack units than the pack has already dispensed (kept the stored; a reload
-- must never make a pack look over-used, nor let a split pack be sold past its end).
local replace = ARGV[1] == '1'
local FIELDS = {'p', 'g', 'b', 'e', 'n', 'm'}
local out = {}
for j = 1, #KEYS / 2 do
  local a = 2 + 7 * (j - 1)
  local key = KEYS[2 * j - 1]
  local cur = redis.call('HMGET', key, 'p', 'g', 'b', 'e', 'n', 'm', 's')
  local status = ARGV[a + 6]
  local used = tonumber(redis.call('HGET', KEYS[2 * j], 'u')) or 0
  if used > tonumber(ARGV[a + 4]) then
    out[j] = 4
  elseif not cur[1] then
    if status == '' then status = 'ACTIVE' end
    redis.call('HSET', key, 'p', ARGV[a], 'g', ARGV[a + 1], 'b', ARGV[a + 2], 'e', ARGV[a + 3],
               'n', ARGV[a + 4], 'm', ARGV[a + 5], 's', status)
    out[j] = 1
  elseif cur[1] ~= ARGV[a] and not replace then
    out[j] = 3
  else
    local same = true
    for f = 1, 6 do
      if cur[f] ~= ARGV[a + f - 1] then same = false end
    end
    if status ~= '' and cur[7] ~= status then same = false end
    if same then
      out[j] = 0
    else
      if status == '' then status = cur[7] or 'ACTIVE' end
      redis.call('HSET', key, 'p', ARGV[a], 'g', ARGV[a + 1], 'b', ARGV[a + 2], 'e', ARGV[a + 3],
                 'n', ARGV[a + 4], 'm', ARGV[a + 5], 's', status)
      out[j] = 2
    end
  end
end
return out
