-- status.lua: change the status of issued codes (lock, recall, ...) with an audit event each,
-- atomically per call.
--
-- KEYS[1] audit stream of the slot, then three per code (keys.py): its bucket, the lot
--   dictionary, its history.
-- ARGV[1] new status   ARGV[2] now, ms   ARGV[3] reason   ARGV[4] actor   ARGV[5] history max
-- ARGV[6] audit max   ARGV[7] only product   ARGV[8] only batch ('' '': any record; a batch
-- recall passes both, so codes the batch index still lists after their record moved to another
-- product or batch are skipped), then the canonical codes in key order.
-- Returns per code the previous status ('' when the code was never issued or is skipped: nothing
-- written).
--@LAYOUT@--
--@STATE@--
--@AUDIT@--

local status, now, reason, actor = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local hist_max, audit_max = tonumber(ARGV[5]), tonumber(ARGV[6])
local only_product, only_batch = ARGV[7], ARGV[8]
local CODE0 = 9
local out = {}
for j = 1, (#KEYS - 1) / 3 do
  local k = 1 + 3 * (j - 1)
  local code = ARGV[CODE0 + j - 1]
  local e = entry_read(KEYS[k + 1], code)
  local r = issuance_of(KEYS[k + 2], e)
  local prev = r and r.s
  if prev and only_product ~= '' and (r.p ~= only_product or r.b ~= only_batch) then
    prev = false
  end
  if not prev then
    out[j] = ''
  else
    out[j] = prev
    if prev ~= status then
      e[E.status] = status == 'ACTIVE' and '' or status
      local detail = prev .. '->' .. status
      if reason ~= '' then detail = detail .. ': ' .. reason end
      history_push(KEYS[k + 3], e, {t = 'STATUS_CHANGED', a = now, s = actor, i = '', l = 0, u = 0,
                                    x = detail}, hist_max)
      entry_write(KEYS[k + 1], code, e)
      audit_add(KEYS[1], audit_max, 't', 'STATUS_CHANGED', 'c', code,
                 's', actor, 'i', '', 'l', 0, 'u', 0, 'x', detail, 'a', now)
    end
  end
end
return out
