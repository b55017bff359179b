-- issue.lua: upsert issuance records, atomically per call (one call carries many records).
--
-- KEYS: two per record (keys.py): the code's bucket and its tag's lot dictionary (a recall finds
--   a batch's codes by their lot id: batch.lua).
-- ARGV[1] replace ('1' overwrites a record issued for another product), then 8 per record:
--   code, product, gtin, batch, expiry (YYYYMMDD or 0), pack units, manufacturer, status ('' =
--   keep the stored status, ACTIVE for a new record; a reload must not undo a recall).
-- Returns one outcome per record: 0 unchanged, 1 created, 2 updated, 3 conflict (kept the stored),
-- 4 rejected: fewer pack units than the pack has already dispensed (kept the stored; a reload
-- must never make a pack look over-used, nor let a split pack be sold past its end).
-- The record's product, gtin, batch, expiry, units and manufacturer are its lot, stored once per
-- tag in the lot dictionary; the code's entry keeps the lot's id, its status and its dispense
-- state, which an upsert leaves as it is.
--@LAYOUT@--
--@STATE@--

local replace = ARGV[1] == '1'
local out = {}
for j = 1, #KEYS / 2 do
  local a = 2 + 8 * (j - 1)
  local bkey, lkey, code = KEYS[2 * j - 1], KEYS[2 * j], ARGV[a]
  local e = entry_read(bkey, code) or {}
  local cur = issuance_of(lkey, e)
  local status = ARGV[a + 7]
  local used = tonumber(e[E.u]) or 0
  local text = lot_text(ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
  if used > tonumber(ARGV[a + 5]) then
    out[j] = 4
  elseif cur and cur.p ~= ARGV[a + 1] and not replace then
    out[j] = 3
  else
    local same = cur and redis.call('HGET', lkey, e[E.lot]) == text
    if cur and status ~= '' and cur.s ~= status then same = false end
    if same then
      out[j] = 0
    else
      if status == '' then status = cur and cur.s or 'ACTIVE' end
      e[E.lot] = lot_id(lkey, text)
      e[E.status] = status == 'ACTIVE' and '' or status
      entry_write(bkey, code, e)
      out[j] = cur and 2 or 1
    end
  end
end
return out
