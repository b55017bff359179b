-- commit.lua: second phase of an ALL_OR_NOTHING settlement that spans hash slots (cluster only).
--
-- verify.lua in mode 'P' judged one part and, when every line was OK, reserved its units. Once
-- every part is prepared the coordinator commits them all ('K') if every part was OK, or releases
-- them all ('X'). A coordinator that dies between the phases leaves only reservations, which
-- expire: nothing is half-done. Committing or aborting twice changes nothing.
--
-- A commit never takes units another settlement holds or has taken: a reservation that is
-- still alive (by this node's clock) is committed as it stands; an expired one only when the
-- pack is exactly as it was at preparation (units used unchanged, 'pu' in the part record) and
-- still has room beside the live reservations of others. Otherwise the part is not committed
-- (state 'E'): its reservations are released and its OK lines report the pack as it stands now,
-- DUPLICATE when another site holds or has used it, QUANTITY_EXCEEDED when its own site did.
-- The coordinator only commits well inside the reservation's life (store.py), so 'E' needs a
-- crash or a stall of many seconds between the decision and this call.
--
-- KEYS[1] part record   KEYS[2] audit stream of its slot
-- then four keys per distinct code of the part, in ARGV code order (as verify.lua):
--   issuance bucket, lot dictionary, state bucket, history
-- ARGV[1] 'K' commit or 'X' abort   ARGV[2] history max   ARGV[3] audit max
-- then the part's distinct codes in key order.
-- Returns {results (packed and stored as verify.lua's), part state, changed}: state 'F' done as decided, 'E' a commit refused as
-- above; changed 0 when the part was already final (a repeated commit or abort).

--@LAYOUT@--
--@STATE@--
--@AUDIT@--

local decision, hist_max, audit_max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local p = redis.call('HMGET', KEYS[1], 'r', 'l', 'ps', 'pu', 'ip', 'at')
if not p[1] then return redis.error_reply('TCNOTFOUND part not found') end
local site, sid = record_owner(KEYS[1])
local at = ms_of(p[6])
local own = {site, sid, at}
if p[3] ~= 'P' then return {p[1], p[3] or 'F', 0} end
local insured = p[5] or ''  -- the settlement's insured pseudonym (gate.lua keeps it on the part)
local me = site .. '\31' .. sid
local ledger = ledger_read(p[2])
local recorded, rows = results_decode(p[1], own)
local KPC = 4

local index = {}
for c = 4, #ARGV do index[ARGV[c]] = c - 3 end

-- Each code's entry (state bucket) and issuance, read once; written back once at the end.
local ent, dirty = {}, {}
local function entry(c)
  if not ent[c] then
    local k = 2 + KPC * (c - 1)
    local code = ARGV[c + 3]
    local e = entry_read(KEYS[k + 3], code)
    ent[c] = e or {}
  end
  return ent[c]
end
local function pack_units(c)
  local k = 2 + KPC * (c - 1)
  local r = issuance_of(KEYS[k + 2], entry_read(KEYS[k + 1], ARGV[c + 3]))
  return r and r.n or 1
end

-- Units per code this part took, from its ledger.
local take = {}
for _, e in ipairs(ledger) do
  if e[2] > 0 then take[e[1]] = (take[e[1]] or 0) + e[2] end
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local prepared_used = p[4] and cjson.decode(p[4]) or {}
local refused = {}  -- code -> 'DUPLICATE' | 'QUANTITY_EXCEEDED': its units are no longer ours
if decision == 'K' then
  for code, units in pairs(take) do
    local c = index[code]
    local e = entry(c)
    local d = {e[E.u], e[E.rv], e[E.fs]}
    local rv = (d[2] and d[2] ~= '') and cjson.decode(d[2]) or {}
    local mine = rv[me]
    if not (mine and mine[2] > now) then
      local used, others = tonumber(d[1]) or 0, 0
      for key, v in pairs(rv) do
        if key ~= me and v[2] > now then others = others + v[1] end
      end
      local pack = pack_units(c)
      if used ~= prepared_used[code] or used + others + units > pack then
        local by_other = (used > 0 and d[3] ~= site) or others > 0
        refused[code] = by_other and 'DUPLICATE' or 'QUANTITY_EXCEEDED'
      end
    end
  end
  if next(refused) ~= nil then decision = 'E' end
end

for code, units in pairs(take) do
  local c = index[code]
  local e = entry(c)
  local rv = (e[E.rv] and e[E.rv] ~= '') and cjson.decode(e[E.rv]) or {}
  rv[me] = nil
  e[E.rv] = next(rv) == nil and '' or cjson.encode(rv)
  dirty[c] = true
  if decision == 'K' then
    local used = tonumber(e[E.u]) or 0
    if used == 0 then
      e[E.u], e[E.fs], e[E.fi], e[E.fa], e[E.at], e[E.fp] = units, site, sid, at, 0, h128f(insured)
    else
      e[E.u] = used + units
    end
  end
end

if decision == 'K' then
  for _, e in ipairs(ledger) do
    if e[2] > 0 then
      local c = index[e[1]]
      history_push(KEYS[2 + KPC * (c - 1) + 4], entry(c), {t = 'DISPENSED', a = at, s = site, i = sid, l = e[4],
                                                           u = e[2], x = '', p = insured}, hist_max)
      dirty[c] = true
      audit_add(KEYS[2], audit_max, 't', 'DISPENSED', 'c', e[1], 's', site,
                 'i', sid, 'l', e[4], 'u', e[2], 'x', '', 'a', at, 'p', insured)
    end
  end
else
  -- Released: nothing of this part is recorded; every line reports its pack as it stands.
  recorded = false
  for i, res in ipairs(rows) do
    local code = ledger[i][1]
    local c = index[code]
    if res[R.verdict] == 'OK' then
      res[R.accepted] = 0
      if refused[code] then res[R.verdict] = refused[code] end
    end
    if c then
      local e = entry(c)
      res[R.used] = tonumber(e[E.u]) or 0
      if res[R.used] > 0 then
        res[R.first_site_id], res[R.first_settlement_id], res[R.first_settled_at_ms] = e[E.fs], e[E.fi], tonumber(e[E.fa])
      else
        res[R.first_site_id], res[R.first_settlement_id], res[R.first_settled_at_ms] = '', '', 0
      end
    end
  end
  for _, e in ipairs(ledger) do e[2] = 0 end
end
for c in pairs(dirty) do entry_write(KEYS[2 + KPC * (c - 1) + 3], ARGV[c + 3], ent[c]) end
local out = results_encode(recorded, rows, own)
redis.call('HSET', KEYS[1], 'r', out, 'l', ledger_text(ledger), 'ps', 'F')
return {out, decision == 'E' and 'E' or 'F', 1}
