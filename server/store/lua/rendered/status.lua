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
-- Generated from tracecode.rules.schema by tracecode.server.store.layout (do not edit here).
local A = {mode = 1, site = 2, settlement_id = 3, settled_at_ms = 4, settle_day = 5, digest = 6, policy = 7, audit_max = 8, history_max = 9, settlement_ttl_s = 10, n_lines = 11, state_ttl = 12, buyer = 13, site_packed = 14, settlement_packed = 15}
local L = {code_index = 0, product_id = 1, units = 2, malformed_reason = 3, line_index = 4}
local R = {verdict = 1, accepted = 2, used = 3, pack_units = 4, status = 5, issued_product_id = 6, expiry = 7, first_site_id = 8, first_settlement_id = 9, first_settled_at_ms = 10, attempts = 11, reason = 12, received_by = 13, code_index = 14, want = 15}
local E = {lot = 1, status = 2, rs = 3, u = 4, fs = 5, fi = 6, fa = 7, at = 8, fp = 9, ev = 10, fd = 11, fl = 12, fu = 13, fx = 14, rv = 15}
local LT = {product_id = 1, gtin = 2, batch = 3, expiry = 4, pack_units = 5, manufacturer = 6}
local NENTRY, NROW = 15, 13
local LINE0, STRIDE = 16, 5
local RA = {site = 1, delivery_id = 2, supplier = 3, received_at_ms = 4, receive_day = 5, digest = 6, audit_max = 7, record_ttl_s = 8, n_lines = 9}
local RL = {code_index = 0, product_id = 1, malformed_reason = 2, line_index = 3}
local NRA, RSTRIDE = 9, 4
local function make_row(t) return {t.verdict, t.accepted, t.used, t.pack_units, t.status, t.issued_product_id, t.expiry, t.first_site_id, t.first_settlement_id, t.first_settled_at_ms, t.attempts, t.reason, t.received_by, t.code_index, t.want} end
local function new_entry() return {false, false, false, false, false, false, false, false, false, false, false, false, false, false, false} end
local function new_lot() return {false, false, false, false, false, false} end
-- _state.lua: the code entries, lots, history and results, spliced into every script that
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
-- An int field of a packed row or ledger line: 0 is written as nothing (layout.py).
-- (istr's body again rather than a call to it: rows and ledgers are packed on every settlement.)
local function zstr(x)
  if x == 0 or x == '0' then return '' end
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

-- The packed forms of rules/packing.py (its docstring says why each is what it is), the same
-- arithmetic: tests/test_packing.py holds this Lua and that Python to each other. Numbers stay
-- below 2^53, so Lua's doubles are exact throughout.
local byte, char, sub = string.byte, string.char, string.sub
-- x (< 2^36) in six characters, most significant first: each six bits plus 63, '?' to '~'.
local function c6(x)
  local f = x % 64; x = (x - f) / 64
  local e = x % 64; x = (x - e) / 64
  local d = x % 64; x = (x - d) / 64
  local c = x % 64; x = (x - c) / 64
  local b = x % 64; x = (x - b) / 64
  return char(x + 63, b + 63, c + 63, d + 63, e + 63, f + 63)
end
-- The value of characters i..j of s.
local function v64(s, i, j)
  local x = 0
  for k = i, j do x = x * 64 + byte(s, k) - 63 end
  return x
end
-- A canonical code's field name in its bucket hash and its batch index (packing.code_field).
-- Remembered for the call (CF): a settlement's code is packed to read its entry, to write it and
-- for the ledger.
local CF = {}
local function pack_code(code)
  local n = #code
  if n == 20 and not string.find(code, '%D') then
    return c6(tonumber(sub(code, 1, 10))) .. c6(tonumber(sub(code, 11, 20)))
  end
  if n > 18 and sub(code, 1, 2) == '01' and sub(code, 17, 18) == '21' and not string.find(sub(code, 3, 16), '%D') then
    local g = tonumber(sub(code, 3, 16))
    local lo = g % 68719476736  -- 2^36
    local hi = (g - lo) / 68719476736
    return '~' .. sub(c6(hi), 5, 6) .. c6(lo) .. sub(code, 19)
  end
  return '!' .. code
end
local function cfield(code)
  local f = CF[code]
  if not f then
    f = pack_code(code)
    CF[code] = f
  end
  return f
end
-- The canonical code of a field name (packing.code_of).
local function code_of(f)
  local k = sub(f, 1, 1)
  if k == '~' then return '01' .. string.format('%014d', v64(f, 2, 9)) .. '21' .. sub(f, 10) end
  if k == '!' then return sub(f, 2) end
  return string.format('%010d%010d', v64(f, 1, 6), v64(f, 7, 12))
end
-- A time in ms (packing.ms_field: seven characters) and back ('' is 0).
local MSF = {}  -- remembered for the call: most times written are the settlement's own
local function msf(ms)
  ms = tonumber(ms)
  local f = MSF[ms]
  if f then return f end
  local lo = ms % 68719476736
  f = char((ms - lo) / 68719476736 + 63) .. c6(lo)
  MSF[ms] = f
  return f
end
local function ms_of(text)
  if not text or text == '' then return 0 end
  return v64(text, 1, #text)
end
-- A site or settlement id whose tail is a run of 10-19 digits (its first not 0): the rest, a
-- marker ('!' + the run's length - 10) and the run as two numbers (packing.id_field). IDF
-- remembers them for the call (a settlement writes its site and id into each code it opens).
local HC = {1, 2, 2, 3, 3, 4, 4, 5, 5, 6}
local function cn(x, n)
  local t = {}
  for i = n, 1, -1 do
    local r = x % 64
    t[i] = r + 63
    x = (x - r) / 64
  end
  return char(unpack(t, 1, n))
end
local IDF = {}
local function idf(s)
  if not s or s == '' then return s end
  local f = IDF[s]
  if f then return f end
  local n, d = #s, 0
  while d < n and d < 19 do
    local b = byte(s, n - d)
    if b < 48 or b > 57 then break end
    d = d + 1
  end
  f = s
  for run = d, 10, -1 do
    if byte(s, n - run + 1) ~= 48 then
      f = sub(s, 1, n - run) .. char(33 + run - 10) .. cn(tonumber(sub(s, n - run + 1, n - 9)), HC[run - 9])
          .. cn(tonumber(sub(s, n - 8, n)), 5)
      break
    end
  end
  IDF[s] = f
  return f
end
local function id_of(f)
  if not f or f == '' then return f end
  local p = string.find(f, '[!-*]')
  if not p then return f end
  local h = HC[byte(f, p) - 32]
  if #f - p ~= h + 5 or string.find(f, '[^?-~]', p + 1) then return f end
  return sub(f, 1, p - 1) .. string.format('%d%09d', v64(f, p + 1, p + h), v64(f, p + h + 1, p + h + 5))
end
-- An id, a dot and 32 hex digits (a pseudonym, a body digest) as the id, the dot and 22
-- characters (packing.hex128_field): the 32 hex digits and a trailing zero are 11 groups of three,
-- each two characters. The server packs a settlement's buyer and digest; this Lua packs only on
-- a cluster's commit (commit.lua) and unpacks a buyer where it needs the pseudonym.
local function h128f(p)
  if not p or p == '' then return p end
  local dot = string.find(p, '.', 1, true)
  if not dot or #p - dot ~= 32 or string.find(p, '[^0-9a-f]', dot + 1) then return p end
  local hex = sub(p, dot + 1) .. '0'
  local out = {sub(p, 1, dot)}
  for k = 1, 31, 3 do
    local v = tonumber(sub(hex, k, k + 2), 16)
    out[#out + 1] = char((v - v % 64) / 64 + 63, v % 64 + 63)
  end
  return table.concat(out)
end
local function h128_of(text)
  if not text or text == '' then return text end
  local dot = string.find(text, '.', 1, true)
  if not dot or #text - dot ~= 22 or string.find(text, '[^?-~]', dot + 1) then return text end
  local out = {sub(text, 1, dot)}
  for k = dot + 1, #text, 2 do out[#out + 1] = string.format('%03x', v64(text, k, k + 1)) end
  local s = table.concat(out)
  return sub(s, 1, #s - 1)  -- the trailing zero of 33 hex digits
end

-- The site and settlement id of a settlement record (or a cluster part's) from its key, spelled
-- by keys.py as '<prefix>:{tag}:s:<len(site)>:<site>:<id>' (a part: ':sp:'): the record does not
-- repeat them.
local function record_owner(key)
  local at = string.find(key, '}:', 1, true)
  local colon = string.find(key, ':', at + 2, true)
  local len_end = string.find(key, ':', colon + 1, true)
  local n = tonumber(sub(key, colon + 1, len_end - 1))
  return sub(key, len_end + 1, len_end + n), sub(key, len_end + n + 2)
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
-- Its field name is the code packed (cfield); its first dispense's time (msf), site and
-- settlement id and its receiving site (idf) are packed in the value and come back here as they
-- were. The first buyer's pseudonym (fp) stays packed
-- (h128f) in the table too: it is written far more often than read (the settlement packs its
-- buyer once for all its codes), and the few readers unpack it (h128_of).
local function entry_read(bkey, code)
  local v = redis.call('HGET', bkey, cfield(code))
  if not v then return nil end
  local e = split(v, US, new_entry())
  local fa = e[E.fa]
  if fa and fa ~= '' then e[E.fa] = istr(ms_of(fa)) end
  e[E.fs], e[E.fi], e[E.rs] = id_of(e[E.fs]), id_of(e[E.fi]), id_of(e[E.rs])
  if e[E.ev] == '=' then e[E.ev], e[E.fd], e[E.fu] = '1', '0', e[E.u] end  -- see entry_write
  return e
end

-- Write an entry back (its table is packed in place and not used after); trailing empty fields
-- are left off (a code never dispensed: its lot id). Fields not set are false or nil.
-- No time and no attempts are written as nothing rather than '0'. The plain first dispense (the
-- code's one event, implicit at position 0, its units all the cycle has used: most dispensed
-- codes) is '=' in `ev` for ev 1, fd 0 and fu = u (entry_read and store.py entry_fields expand
-- it), and line index 0 is nothing.
local function entry_write(bkey, code, e)
  local fa, at = tonumber(e[E.fa]), e[E.at]
  e[E.fa] = (fa and fa ~= 0) and msf(fa) or ''
  e[E.fs], e[E.fi], e[E.rs] = idf(e[E.fs]), idf(e[E.fi]), idf(e[E.rs])
  if at == 0 or at == '0' then e[E.at] = '' end
  local ev, fd, fl = e[E.ev], e[E.fd], e[E.fl]
  if (fd == 0 or fd == '0') and (ev == 1 or ev == '1') and e[E.fx] ~= '1'
     and tonumber(e[E.fu]) == tonumber(e[E.u]) then
    e[E.ev], e[E.fd], e[E.fu] = '=', '', ''
  end
  if fl == 0 or fl == '0' then e[E.fl] = '' end
  local n = NENTRY
  while n > 1 and (not e[n] or e[n] == '') do n = n - 1 end
  for i = 1, n do e[i] = istr(e[i] or '') end
  redis.call('HSET', bkey, cfield(code), table.concat(e, US, 1, n))
end

-- The lot text of an issuance record (LOT_FIELDS order).
local function lot_text(product, gtin, batch, expiry, units, mfr)
  return table.concat({product, gtin, batch, expiry, units, mfr}, US)
end

-- The id of a lot in the tag's lot dictionary `lkey`, adding it when absent: a small number in
-- the order the tag met its lots (field '#' counts them), since every code of the tag carries it.
-- The lot is found by its content through '=' and the first 16 hex digits of its SHA-1; on the
-- rare collision with another lot the next probe is '=<digits>.<k>', the same on every lookup.
local function lot_id(lkey, text)
  local base = '=' .. string.sub(redis.sha1hex(text), 1, 16)
  local probe, k = base, 0
  while true do
    local id = redis.call('HGET', lkey, probe)
    if not id then
      id = tostring(redis.call('HINCRBY', lkey, '#', 1))
      redis.call('HSET', lkey, id, text, probe, id)
      return id
    end
    if redis.call('HGET', lkey, id) == text then return id end
    k = k + 1
    probe = base .. '.' .. k
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
                              l = tonumber(e[E.fl]) or 0, u = tonumber(e[E.fu]) or 0, x = '', p = h128_of(e[E.fp] or '')})
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
local function row_text(r)
  local v, s = r[1], r[5]
  if v == 'OK' and s == 'ACTIVE' then v, s = '', '' end
  local t = v .. US .. zstr(r[2]) .. US .. zstr(r[3]) .. US .. zstr(r[4]) .. US .. s .. US .. r[6] .. US .. zstr(r[7]) .. US .. r[8] .. US .. r[9] .. US .. zstr(r[10]) .. US .. zstr(r[11]) .. US .. r[12] .. US .. r[13]
  local cut = string.find(t, '\031+$')
  if cut then return string.sub(t, 1, cut - 1) end
  return t
end
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

-- The inverse (`own` as above). The numbers come back as numbers, in ROW_FIELDS' int positions;
-- the fields written as nothing (row_text) come back as they were.
local ROW_INTS = {R.accepted, R.used, R.pack_units, R.expiry, R.first_settled_at_ms, R.attempts}
local function results_decode(text, own)
  local parts = split(text, RS)
  local rows = {}
  for i = 2, #parts do
    local row = split(parts[i], US)
    for k = #row + 1, NROW do row[k] = '' end
    if row[R.verdict] == '' then row[R.verdict], row[R.status] = 'OK', 'ACTIVE' end
    if row[R.first_site_id] == '=' then
      row[R.first_site_id], row[R.first_settlement_id], row[R.first_settled_at_ms] = own[1], own[2], own[3]
    end
    for _, k in ipairs(ROW_INTS) do row[k] = inum(row[k]) or 0 end
    rows[i - 1] = row
  end
  return parts[1] == '1', rows
end

-- A settlement's ledger (per line: code, units taken, units returned, line index) in its packed
-- form (layout.py): per line RS and the fields joined by US, the code packed (cfield; '' for a
-- malformed line), 0 as '', the index as '' when it is the line's position `pos` (0-based) in
-- the ledger, trailing empty fields left off.
local function ledger_line(code, taken, returned, line, pos)
  if code ~= '' then code = cfield(code) end
  if tonumber(line) == pos then line = '' end
  local t = RS .. code .. US .. zstr(taken) .. US .. zstr(returned) .. US .. zstr(line)
  local cut = string.find(t, '\031+$')
  if cut then return string.sub(t, 1, cut - 1) end
  return t
end
local function ledger_text(ledger)
  local out = presized(#ledger)
  for i, e in ipairs(ledger) do out[i] = ledger_line(e[1], e[2], e[3], e[4], i - 1) end
  return table.concat(out)
end
-- A stored ledger as a list of {code, taken, returned, line index}, its codes unpacked (code_of).
local function ledger_read(text)
  local parts = split(text, RS)
  local ledger = presized(#parts - 1)
  for i = 2, #parts do
    local f = split(parts[i], US)
    local code = f[1]
    if code ~= '' then code = code_of(code) end
    local line = tonumber(f[4])
    if not line then line = i - 2 end
    ledger[i - 1] = {code, tonumber(f[2]) or 0, tonumber(f[3]) or 0, line}
  end
  return ledger
end

-- audit_add(stream, limit, field, value, ...): append one audit entry (spliced into every script
-- that writes one, store.script_text). `limit` is the caller's audit_max argument:
--   limit > 0   no archive: the stream is kept near `limit` entries (MAXLEN ~), older ones lost.
--   limit < 0   an archiver runs (tracecode archive): it trims the stream itself at its archived
--               watermark (MINID, archive_commit.lua), so nothing unarchived goes. Only past the
--               hard bound -limit, kept to protect Redis memory when the archiver stops, are
--               entries dropped here: the archived ones first, then the oldest unarchived, whose
--               count and ID range go to the stream's archive hash for the archiver to count,
--               alert on and log (server/store/archive.py).
-- The archive hash '<stream>:archive' and the list '<stream>:drops' share the stream's hash tag
-- (same slot); their names are derived here rather than passed in KEYS so every caller keeps its
-- key list.
local function audit_add(stream, limit, ...)
  limit = tonumber(limit)
  if limit >= 0 then return redis.call('XADD', stream, 'MAXLEN', '~', limit, '*', ...) end
  local id = redis.call('XADD', stream, '*', ...)
  local bound = -limit
  if redis.call('XLEN', stream) <= bound then return id end
  local state = stream .. ':archive'
  local m = redis.call('HGET', state, 'm')  -- the first ID past the archived watermark
  if m then redis.call('XTRIM', stream, 'MINID', m) end
  local len = redis.call('XLEN', stream)
  if len <= bound then return id end
  -- Trim well below the bound (1/16 of it) so a stalled archiver costs one trim per many entries.
  local keep = bound - math.floor(bound / 16)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
  local dropped = redis.call('XTRIM', stream, 'MAXLEN', keep)
  local after = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
  redis.call('HINCRBY', state, 'd', dropped)
  -- The dropped range [first, after), for the archiver's log (the newest 1000 ranges kept).
  redis.call('RPUSH', stream .. ':drops', first .. ' ' .. after .. ' ' .. dropped)
  redis.call('LTRIM', stream .. ':drops', -1000, -1)
  return id
end


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
