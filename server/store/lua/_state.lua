-- _state.lua: layout 2's code entries, lots, history and results, spliced into every script that
-- touches them (store.script_text), so they are packed and unpacked by one set of functions.
-- E, LT, R, NENTRY and NROW come from tracecode.server.store.layout (its Lua is spliced first).
--
-- A code's entry is one field of its bucket hash (keys.py): ENTRY_FIELDS joined by US. Fields are
-- strings as read; callers convert the numbers they use (tonumber) and may store numbers back.

local US, RS = '\31', '\30'

-- Numbers become text through this memo, not Lua's own "%.14g" (a floating-point printf, which
-- measured under callgrind was a sixth of a settlement's instructions): most numbers written
-- were just read as text (inum remembers it: the settlement's time, expiries, first dispenses)
-- or are small counts. One table per script call, so it stays small.
local ISTR = {}
local function istr(x)
  if type(x) ~= 'number' then return x end
  local s = ISTR[x]
  if not s then
    s = string.format('%d', x)
    ISTR[x] = s
  end
  return s
end
local function inum(text)
  local n = tonumber(text)
  if n then ISTR[n] = text end
  return n
end

-- A table whose array part already holds n slots (all nil): Lua 5.1 sizes a table built by a
-- constructor from a call's results once, where filling an empty one grows it step by step.
local NONE = {}
local function presized(n) return {unpack(NONE, 1, n)} end

-- The fields of v between the separators, into `out` (a table made by a constructor of the
-- right size, new_entry() or new_lot(); a fresh table when none: its size is unknown).
local function split(v, sep, out)
  out = out or {}
  local pos, i = 1, 1
  while true do
    local s = string.find(v, sep, pos, true)
    if not s then out[i] = string.sub(v, pos); return out end
    out[i] = string.sub(v, pos, s - 1)
    pos, i = s + 1, i + 1
  end
end

-- The entry of `code` in bucket `bkey` as a table (E positions), or nil when there is none.
local function entry_read(bkey, code)
  local v = redis.call('HGET', bkey, code)
  if not v then return nil end
  return split(v, US, new_entry())
end

-- Write an entry back (its table is packed in place and not used after); trailing empty fields
-- are left off (a code never dispensed: its lot id). Fields not set are false or nil.
local function entry_write(bkey, code, e)
  local n = NENTRY
  while n > 1 and (not e[n] or e[n] == '') do n = n - 1 end
  for i = 1, n do e[i] = istr(e[i] or '') end
  redis.call('HSET', bkey, code, table.concat(e, US, 1, n))
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
  local l = split(v, US, new_lot())
  local s = e[E.status]
  if not s or s == '' then s = 'ACTIVE' end
  return {p = l[LT.product_id], g = l[LT.gtin], b = l[LT.batch], e = inum(l[LT.expiry]) or 0,
          n = inum(l[LT.pack_units]) or 1, m = l[LT.manufacturer], s = s}
end

-- The history of a code: the list `hkey` holds its events beyond the first-ever DISPENSED one,
-- which stays implicit in the entry (its time, site, settlement and pseudonym are the entry's
-- first dispense; fl/fu its line and units; fd its position among the kept events) until a
-- return empties the pack and a new use cycle would overwrite them (history_explicit). At most
-- hist_max events are kept (all of them are counted in ev). Past the cap the oldest goes, never
-- the first-ever DISPENSED event: a flood of duplicate attempts (every one of them also in the
-- audit stream) can never push out the evidence of who dispensed the pack first.
-- The pack's first-ever DISPENSED event (line index, units): kept implicit, at its position.
local function history_first(hkey, e, line, units, hist_max)
  local before = tonumber(e[E.ev]) or 0
  e[E.ev] = before + 1
  local len = before == 0 and 0 or redis.call('LLEN', hkey)  -- no event yet: no list either
  e[E.fd], e[E.fl], e[E.fu] = len, line, units
  if len + 1 > hist_max then
    -- The list's oldest goes; it came before the first dispense, which moves up.
    redis.call('LPOP', hkey)
    e[E.fd] = len - 1
  end
end

local function history_push(hkey, e, event, hist_max)
  local fd = tonumber(e[E.fd])
  if not fd and event.t == 'DISPENSED' then return history_first(hkey, e, event.l, event.u, hist_max) end
  e[E.ev] = (tonumber(e[E.ev]) or 0) + 1
  local implicit = fd and e[E.fx] ~= '1'
  local len = redis.call('RPUSH', hkey, cjson.encode(event))
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
--@ROWTEXT@--
local function results_encode(recorded, rows, own)
  local text = recorded and '1' or '0'
  for _, row in ipairs(rows) do
    local a, b, c = row[R.first_site_id], row[R.first_settlement_id], row[R.first_settled_at_ms]
    if own and a == own[1] and b == own[2] and istr(c) == istr(own[3]) then
      row[R.first_site_id], row[R.first_settlement_id], row[R.first_settled_at_ms] = '=', '', ''
      text = text .. RS .. row_text(row)
      row[R.first_site_id], row[R.first_settlement_id], row[R.first_settled_at_ms] = a, b, c
    else
      text = text .. RS .. row_text(row)
    end
  end
  return text
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
    for _, k in ipairs(ROW_INTS) do row[k] = inum(row[k]) end
    rows[i - 1] = row
  end
  return parts[1] == '1', rows
end

-- A settlement's ledger (per line: code, units taken, units returned, line index) as json; built
-- here rather than by cjson, whose numbers go through the same slow printf.
local function ledger_line(code, taken, returned, line)
  if string.find(code, '["\\]') then code = string.gsub(code, '(["\\])', '\\%1') end
  return '["' .. code .. '",' .. istr(taken) .. ',' .. istr(returned) .. ',' .. istr(line) .. ']'
end
