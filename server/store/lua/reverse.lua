-- reverse.lua: a return (退药) of some or all lines of one settlement, atomically.
--
-- KEYS[1] settlement record    KEYS[2] audit stream of its slot
-- then two keys per distinct code of the ledger, in ARGV code order: its state bucket (keys.py),
--   its history
-- ARGV[1] site   ARGV[2] now, ms   ARGV[3] return window, ms   ARGV[4] history max   ARGV[5] audit max
-- ARGV[6] note   ARGV[7] number of distinct codes C, then the C codes, then the 0-based line indexes
--   to reverse (none: every recorded line)
-- Returns the json list of [line_index, code, units_returned, units_used_after, already_reversed].
-- Errors: TCNOTFOUND, TCWINDOW <age ms>, TCBADLINE <index>, TCPRUNED <index> <code> (a line to give
--   back whose pack has no entry any more: pruned after expiry; checked before anything is written).
-- The ledger keeps, per line, [code, units accepted, units returned, line index]; a returned line stays returned,
-- so a second call changes nothing and reports the same units.

--@LAYOUT@--
--@STATE@--
--@AUDIT@--

local site, now, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local hist_max, audit_max, note = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local C = tonumber(ARGV[7])

local s = redis.call('HMGET', KEYS[1], 'l', 'at')
if not s[1] then return redis.error_reply('TCNOTFOUND settlement not found') end
local settled_at = ms_of(s[2])
if now - settled_at > window then
  return redis.error_reply('TCWINDOW ' .. tostring(now - settled_at))
end
local ledger = ledger_read(s[1])
local _, sid = record_owner(KEYS[1])
local slot = {}
for c = 1, C do slot[ARGV[7 + c]] = c end

-- Ledger entries carry their line's index in the whole settlement (a cluster part holds some lines).
local by_index = {}
for _, e in ipairs(ledger) do by_index[e[4]] = e end
local wanted = {}
if #ARGV > 7 + C then
  for j = 8 + C, #ARGV do
    local idx = tonumber(ARGV[j])
    if not by_index[idx] then return redis.error_reply('TCBADLINE ' .. ARGV[j]) end
    wanted[#wanted + 1] = idx
  end
else
  for _, e in ipairs(ledger) do
    if e[2] > 0 then wanted[#wanted + 1] = e[4] end
  end
end

-- A line that would give units back needs its pack's entry: prune-expired may have dropped it.
-- Every such line is checked before any write, so a refused return changes nothing.
for _, idx in ipairs(wanted) do
  local line = by_index[idx]
  if line[3] == 0 and line[2] > 0 then
    local c = slot[line[1]]
    if not (c and entry_read(KEYS[2 * c + 1], line[1])) then
      return redis.error_reply('TCPRUNED ' .. tostring(idx) .. ' ' .. line[1])
    end
  end
end

local out, changed = {}, false
for _, idx in ipairs(wanted) do
  local line = by_index[idx]
  local code, accepted, returned = line[1], line[2], line[3]
  local c = slot[code]
  local dkey, hkey
  if c then dkey, hkey = KEYS[2 * c + 1], KEYS[2 * c + 2] end
  -- A line that took nothing (flagged, malformed, or not recorded under ALL_OR_NOTHING) has
  -- nothing to give back: it reports 0 units, not "already reversed", and changes nothing.
  local already = returned > 0
  local e = c and (entry_read(dkey, code) or {})
  if not already and accepted > 0 and c then
    local used = tonumber(e[E.u]) or 0
    used = math.max(used - accepted, 0)
    if used == 0 then
      -- Back at zero the pack is sellable again anywhere: a new first dispense will be recorded,
      -- and the attempts counted against the old one no longer apply. The first-ever dispense,
      -- implicit in these fields so far, goes into the history list before they are cleared.
      history_explicit(hkey, e)
      e[E.u], e[E.fs], e[E.fi], e[E.fa], e[E.at], e[E.fp] = 0, '', '', 0, 0, ''
    else
      e[E.u] = used
    end
    line[3] = accepted
    changed = true
    history_push(hkey, e, {t = 'REVERSED', a = now, s = site, i = sid, l = idx, u = accepted, x = note}, hist_max)
    entry_write(dkey, code, e)
    audit_add(KEYS[2], audit_max, 't', 'REVERSED', 'c', code, 's', site,
               'i', sid, 'l', idx, 'u', accepted, 'x', note, 'a', now)
  end
  local used_after = c and (tonumber(e[E.u]) or 0) or 0
  out[#out + 1] = {idx, code, line[3], used_after, already and 1 or 0}
end
if changed then redis.call('HSET', KEYS[1], 'l', ledger_text(ledger)) end
return cjson.encode(out)
