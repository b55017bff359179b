-- _state.lua: layout 2's code entries, lots, history and results, spliced into every script that
-- touches them (store.script_text), so they are packed and unpacked by one set of functions.
-- E, LT, R, NENTRY and NROW come from tracecode.server.store.layout (its Lua is spliced first).
--
-- A code's entry is one field of its bucket hash (keys.py): ENTRY_FIELDS joined by US. Fields are
-- strings as read; callers convert the numbers they use (tonumber) and may store numbers back.

local US, RS = '\31', '\30'

local function split(v, sep)
  local out, pos = {}, 1
  while true do
    local s = string.find(v, sep, pos, true)
    if not s then out[#out + 1] = string.sub(v, pos); return out end
    out[#out + 1] = string.sub(v, pos, s - 1)
    pos = s + 1
  end
end

-- The entry of `code` in bucket `bkey` as a table (E positions), or nil when there is none.
local function entry_read(bkey, code)
  local v = redis.call('HGET', bkey, code)
  if not v then return nil end
  return split(v, US)
end

-- Write an entry back; trailing empty fields are left off (a code never dispensed: its lot id).
local function entry_write(bkey, code, e)
  local n = NENTRY
  while n > 1 and (e[n] == nil or e[n] == '') do n = n - 1 end
  -- table.concat writes numbers as %.14g: integers below 10^14 (ms until the year 5138) exactly.
  local t = {}
  for i = 1, n do t[i] = e[i] or '' end
  redis.call('HSET', bkey, code, table.concat(t, US))
end

-- The lot text of an issuance record (LOT_FIELDS order).
local function lot_text(product, gtin, batch, expiry, units, mfr)
  return table.concat({product, gtin, batch, expiry, units, mfr}, US)
end

-- The id of a lot in the tag's lot dictionary `lkey`, adding it when absent. Content-addressed
-- (the first 12 hex digits of its SHA-1), so codes of one lot share one entry; on the rare
-- collision with another lot the id gets a suffix, probed the same way on every lookup.
local function lot_id(lkey, text)
  local base = string.sub(redis.sha1hex(text), 1, 12)
  local id, k = base, 0
  while true do
    local have = redis.call('HGET', lkey, id)
    if not have then redis.call('HSET', lkey, id, text); return id end
    if have == text then return id end
    k = k + 1
    id = base .. '.' .. k
  end
end

-- An issuance record {p, g, b, e, n, m, s} from an entry, or false when the code is not issued.
local function issuance_of(lkey, e)
  if not e or not e[E.lot] or e[E.lot] == '' then return false end
  local v = redis.call('HGET', lkey, e[E.lot])
  if not v then error({err = 'ERR tracecode: lot ' .. e[E.lot] .. ' missing from ' .. lkey}) end
  local l = split(v, US)
  local s = e[E.status]
  if not s or s == '' then s = 'ACTIVE' end
  return {p = l[LT.product_id], g = l[LT.gtin], b = l[LT.batch], e = tonumber(l[LT.expiry]) or 0,
          n = tonumber(l[LT.pack_units]) or 1, m = l[LT.manufacturer], s = s}
end

-- The history of a code: the list `hkey` holds its events beyond the first-ever DISPENSED one,
-- which stays implicit in the entry (its time, site, settlement and pseudonym are the entry's
-- first dispense; fl/fu its line and units; fd its position among the kept events) until a
-- return empties the pack and a new use cycle would overwrite them (history_explicit). At most
-- hist_max events are kept (all of them are counted in ev). Past the cap the oldest goes, never
-- the first-ever DISPENSED event: a flood of duplicate attempts (every one of them also in the
-- audit stream) can never push out the evidence of who dispensed the pack first.
local function history_push(hkey, e, event, hist_max)
  local before = tonumber(e[E.ev]) or 0
  e[E.ev] = before + 1
  local fd = tonumber(e[E.fd])
  local implicit = fd and e[E.fx] ~= '1'
  local len
  if not fd and event.t == 'DISPENSED' then
    len = before == 0 and 0 or redis.call('LLEN', hkey)  -- no event yet: no list either
    e[E.fd], e[E.fl], e[E.fu] = len, event.l, event.u
    fd, implicit = len, true
  else
    len = redis.call('RPUSH', hkey, cjson.encode(event))
  end
  if len + (implicit and 1 or 0) > hist_max then
    if implicit then
      -- The list's oldest goes; when it came before the first dispense, that one moves up.
      redis.call('LPOP', hkey)
      if fd > 0 then e[E.fd] = fd - 1 end
    else
      local drop = 0
      if fd == 0 then
        drop = 1
      elseif fd then
        e[E.fd] = fd - 1
      end
      redis.call('LSET', hkey, drop, '\0drop')
      redis.call('LREM', hkey, 1, '\0drop')
    end
  end
end

-- Write the implicit first-ever DISPENSED event into the list at its position, before the entry's
-- first dispense fields change (a return that empties the pack).
local function history_explicit(hkey, e)
  local fd = tonumber(e[E.fd])
  if not fd or e[E.fx] == '1' then return end
  local event = cjson.encode({t = 'DISPENSED', a = tonumber(e[E.fa]) or 0, s = e[E.fs] or '', i = e[E.fi] or '',
                              l = tonumber(e[E.fl]) or 0, u = tonumber(e[E.fu]) or 0, x = '', p = e[E.fp] or ''})
  if fd == 0 then
    redis.call('LPUSH', hkey, event)
  else
    local tail = redis.call('LRANGE', hkey, fd, -1)
    redis.call('LTRIM', hkey, 0, fd - 1)
    redis.call('RPUSH', hkey, event, unpack(tail))
  end
  e[E.fx], e[E.fl], e[E.fu] = '1', '', ''
end

-- Results: "0"|"1", then per line RS and the row's NROW fields joined by US (layout.py). With
-- `own` ({site, settlement id, settled_at}) the stored form: a first dispense that is the
-- settlement's own (most OK lines) is written '=', '', '' instead of repeating them on every line.
local function results_encode(recorded, rows, own)
  local t = {recorded and '1' or '0'}
  for i, row in ipairs(rows) do
    local f = {}
    for k = 1, NROW do f[k] = row[k] end
    if own and f[R.first_site_id] == own[1] and f[R.first_settlement_id] == own[2]
       and f[R.first_settled_at_ms] == own[3] then
      f[R.first_site_id], f[R.first_settlement_id], f[R.first_settled_at_ms] = '=', '', ''
    end
    t[i + 1] = table.concat(f, US)
  end
  return table.concat(t, RS)
end

-- The inverse, of either form (`own` as above), and of layout 1's JSON too (a record stored before
-- the migration). The numbers come back as numbers, in ROW_FIELDS' int positions.
local ROW_INTS = {R.accepted, R.used, R.pack_units, R.expiry, R.first_settled_at_ms, R.attempts}
local function results_decode(text, own)
  if string.sub(text, 1, 1) == '{' then
    local doc = cjson.decode(text)
    return doc.rec == 1, doc.l
  end
  local parts = split(text, RS)
  local rows = {}
  for i = 2, #parts do
    local row = split(parts[i], US)
    if row[R.first_site_id] == '=' then
      row[R.first_site_id], row[R.first_settlement_id], row[R.first_settled_at_ms] = own[1], own[2], own[3]
    end
    for _, k in ipairs(ROW_INTS) do row[k] = tonumber(row[k]) end
    rows[i - 1] = row
  end
  return parts[1] == '1', rows
end

-- A stored answer as a reply: the full form (layout 1's JSON stays as it is; the store reads both).
local function results_reply(stored, own)
  if string.sub(stored, 1, 1) == '{' then return stored end
  local recorded, rows = results_decode(stored, own)
  return results_encode(recorded, rows)
end
