-- _history.lua: spliced into every script that logs a code's events (store._script_text), so the
-- history list is kept by one function.
--
-- A code's history list holds at most hist_max events (all of them are counted in the dispense
-- hash's 'ev'). Past the cap the oldest event goes, except the pack's very first DISPENSED event:
-- its index is kept in the dispense hash ('fd'), and once it is the oldest, the event after it
-- goes instead. A flood of duplicate attempts (every one of them also in the
-- audit stream) can therefore never push out the evidence of who dispensed the pack first.
local function history_push(hkey, dkey, event, hist_max)
  local len = redis.call('RPUSH', hkey, cjson.encode(event))
  redis.call('HINCRBY', dkey, 'ev', 1)
  local fd = tonumber(redis.call('HGET', dkey, 'fd'))
  if not fd and event.t == 'DISPENSED' then
    fd = len - 1
    redis.call('HSET', dkey, 'fd', fd)
  end
  if len > hist_max then
    -- The oldest event goes, unless it is the first dispense: then the one after it.
    local drop = 0
    if fd == 0 then
      drop = 1
    elseif fd then
      redis.call('HSET', dkey, 'fd', fd - 1)
    end
    redis.call('LSET', hkey, drop, '\0drop')
    redis.call('LREM', hkey, 1, '\0drop')
  end
end
