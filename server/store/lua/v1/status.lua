-- status.lua: change the status of issued codes (lock, recall, ...) with an audit event each,
-- atomically per call.
--
-- KEYS[1] audit stream of the slot, then three per code: issuance, dispense state, history.
-- ARGV[1] new status   ARGV[2] now, ms   ARGV[3] reason   ARGV[4] actor   ARGV[5] history max
-- ARGV[6] audit max   ARGV[7] only product   ARGV[8] only batch ('' '': any record; a batch
-- recall passes both, so codes the batch index still lists after their record moved to another
-- product or batch are skipped), then the canonical codes in key order.
-- Returns per code the previous status ('' when the code was never issued or is skipped: nothing
-- written).
--@HISTORY@--

local status, now, reason, actor = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local hist_max, audit_max = tonumber(ARGV[5]), tonumber(ARGV[6])
local only_product, only_batch = ARGV[7], ARGV[8]
local CODE0 = 9
local out = {}
for j = 1, (#KEYS - 1) / 3 do
  local k = 1 + 3 * (j - 1)
  local code = ARGV[CODE0 + j - 1]
  local cur = redis.call('HMGET', KEYS[k + 1], 's', 'p', 'b')
  local prev = cur[1]
  if prev and only_product ~= '' and (cur[2] ~= only_product or cur[3] ~= only_batch) then
    prev = false
  end
  if not prev then
    out[j] = ''
  else
    out[j] = prev
    if prev ~= status then
      redis.call('HSET', KEYS[k + 1], 's', status)
      local detail = prev .. '->' .. status
      if reason ~= '' then detail = detail .. ': ' .. reason end
      history_push(KEYS[k + 3], KEYS[k + 2], {t = 'STATUS_CHANGED', a = now, s = actor, i = '', l = 0, u = 0,
                                              x = detail}, hist_max)
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', audit_max, '*', 't', 'STATUS_CHANGED', 'c', code,
                 's', actor, 'i', '', 'l', 0, 'u', 0, 'x', detail, 'a', now)
    end
  end
end
return out
