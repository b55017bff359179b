-- gate.lua: the sanction gate around verify.lua. store.py loads verify.lua as the body of the
-- function below (at the VERIFY placeholder), so one script call both judges the settlement's sanctions
-- and its codes: on a single Redis node no settlement that starts after a sanction was stored
-- can pass (docs/verification.md, "Sanctions").
--
-- The caller appends to verify.lua's own KEYS and ARGV (which this prelude removes again, so
-- verify.lua sees exactly its documented layout):
--   KEYS: G sanction index keys (hash id -> entry json: the site's, then the person's; none on a
--         cluster, where they live in another slot and the server's view judges instead)
--   ARGV: the insured pseudonym ('' when the POS sent none), the gate mode, G, the live rules'
--         configuration ('' off; rules/live.py LiveRules.lua_arg, lua/_live.lua)
-- Gate modes: 'E' enforce (a live dispense: a binding sanction refuses the settlement before
-- anything is read or marked, unless the settlement id is already recorded, which replays);
-- 'N' notices (a live check: the binding entries are returned as a json list, the answer's 4th element);
-- '' none (bulk jobs, the cluster: sanctions are judged by the server).
-- A refusal is audited (t = REFUSED, n = the sanction entry that refused it) and answered with
-- the error "TCSANCTION <json list of the binding entries>".
-- `insured` is visible to verify.lua (an upvalue): the first dispense's pseudonym is kept in the
-- dispense state (field fp) and on each event (p).
local live_cfg = table.remove(ARGV)
local gate_n = tonumber(table.remove(ARGV))
local gate_mode = table.remove(ARGV)
local insured = table.remove(ARGV)
local gate_keys = {}
for g = gate_n, 1, -1 do gate_keys[g] = table.remove(KEYS) end

-- The node's own clock times sanctions, as it times reservations (verify.lua): every server
-- of a deployment sees a sanction start and end at the same instant whatever its clock.
local function node_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The same rule as sanctions.Sanction.binds_now.
local function binding(now)
  local found = {}
  for _, key in ipairs(gate_keys) do
    for _, v in ipairs(redis.call('HVALS', key)) do
      local e = cjson.decode(v)
      if e.l == 0 and (e.f <= e.c or e.f <= now) and (e.u == 0 or now < e.u) then found[#found + 1] = v end
    end
  end
  return found
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


-- _live.lua: the live rules (tracecode.rules.live) over one person's state. Spliced into
-- gate.lua (one node: judged inside the settlement's own call) and live.lua (a cluster: the
-- second call, in the person's own slot).
--
-- A person's state, keyed by pseudonym only, under the hash tag live_tag(pseudonym) (the same
-- rule as rules/live.py person_tag), every key expiring:
--   <prefix>:<tag>:vc:<pseudonym>:<product>  zset  STOCKPILING: the codes (packed: rules/packing.py,
--                                                  as the callers pass them) of the product's packs
--                                                  bought (OK lines), score the settled_at ms of the
--                                                  latest; entries before the window dropped, at
--                                                  most max_entries kept
--   <prefix>:<tag>:vt:<pseudonym>:<product>  zset  the sites they were bought at, the same way
--   <prefix>:<tag>:vr:<pseudonym>            zset  RESALE_SOURCE: the codes of packs first dispensed
--                                                  to the person and sold again at another site,
--                                                  score the first such resale's settled_at ms
-- So each count is a ZCOUNT over the window (O(log n)), never a read of the person's history.
-- A notice: {m = model, v = version, a = 'N' notice | 'R' refusal, k = packs, s = sites,
-- g = product, w = window hours}.

local function live_parse(cfg)
  local f = {}
  for v in string.gmatch(cfg .. '|', '(.-)|') do f[#f + 1] = v end
  return {mode = f[1], sp_action = f[2], sp_packs = tonumber(f[3]), sp_sites = tonumber(f[4]),
          sp_window = tonumber(f[5]), sp_version = tonumber(f[6]), rs_action = f[7], rs_packs = tonumber(f[8]),
          rs_window = tonumber(f[9]), rs_version = tonumber(f[10]), prefix = f[11], max_entries = tonumber(f[12])}
end

local function live_tag(p)
  local h = string.match(p, '%.(%x%x%x)')
  return string.format('{%04d}', h and (tonumber(h, 16) % 1024) or 0)
end

local function live_key(cfg, kind, p, product)
  local k = cfg.prefix .. ':' .. live_tag(p) .. ':' .. kind .. ':' .. p
  if product then k = k .. ':' .. product end
  return k
end

-- Credit resold packs to their first buyers: credits = {{pseudonym, packed code}, ...}. key(kind, p)
-- names a person's key. A pack counts once (ZADD NX keeps its first resale).
local function live_credit(cfg, key, at, credits)
  if cfg.rs_action == 'O' then return end
  local ttl = math.ceil(cfg.rs_window / 1000) + 3600
  for _, c in ipairs(credits) do
    local k = key('vr', c[1])
    redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. (at - cfg.rs_window))
    redis.call('ZADD', k, 'NX', at, c[2])
    redis.call('EXPIRE', k, ttl)
  end
end

-- Distinct packs and sites of a product group in [lo, now], this settlement's counted in,
-- without writing (a rule may refuse it).
local function live_count(g, lo, site)
  local nc = redis.call('ZCOUNT', g.ck, lo, '+inf')
  for _, score in ipairs(redis.call('ZMSCORE', g.ck, unpack(g.codes))) do
    if not score or tonumber(score) < lo then nc = nc + 1 end
  end
  local ns = redis.call('ZCOUNT', g.sk, lo, '+inf')
  local known = redis.call('ZSCORE', g.sk, site)
  if not known or tonumber(known) < lo then ns = ns + 1 end
  return nc, ns
end

-- Record a product group's packs and this site in the window (older entries dropped, at most
-- max_entries codes kept, both keys expiring a window after their last write); returns the
-- distinct packs and sites now in it.
local function live_record(cfg, g, at, site)
  local lo = '(' .. (at - cfg.sp_window)
  local ttl = math.ceil(cfg.sp_window / 1000) + 3600
  local args = {}
  for _, code in ipairs(g.codes) do args[#args + 1] = at; args[#args + 1] = code end
  redis.call('ZREMRANGEBYSCORE', g.ck, '-inf', lo)
  redis.call('ZADD', g.ck, 'GT', unpack(args))
  local nc = redis.call('ZCARD', g.ck)
  if nc > cfg.max_entries then
    redis.call('ZREMRANGEBYRANK', g.ck, 0, nc - cfg.max_entries - 1)
    nc = cfg.max_entries
  end
  redis.call('EXPIRE', g.ck, ttl)
  redis.call('ZREMRANGEBYSCORE', g.sk, '-inf', lo)
  redis.call('ZADD', g.sk, 'GT', at, site)
  local ns = redis.call('ZCARD', g.sk)
  redis.call('EXPIRE', g.sk, ttl)
  return nc, ns
end

-- Judge the person's rules with this settlement counted: packs = {{product, code}, ...} (its
-- OK lines), credits this settlement gives (some may be the person's own). Returns the notices
-- and the first refusal among them (nil when none); records the person's STOCKPILING state only
-- when `write` and nothing refused. key(kind, person, product) names a state key.
local function live_judge(cfg, key, person, site, at, packs, credits, write)
  local notices, refusal = {}, nil
  if person == '' then return notices, nil end
  local function add(n)
    notices[#notices + 1] = n
    if n.a == 'R' and not refusal then refusal = n end
  end
  local groups = {}
  if cfg.sp_action ~= 'O' and #packs > 0 then
    local lo = at - cfg.sp_window
    local by = {}
    for _, p in ipairs(packs) do
      local g = by[p[1]]
      if not g then
        g = {product = p[1], seen = {}, codes = {}}
        by[p[1]] = g
        groups[#groups + 1] = g
      end
      if not g.seen[p[2]] then g.seen[p[2]], g.codes[#g.codes + 1] = true, p[2] end
    end
    for _, g in ipairs(groups) do
      g.ck, g.sk = key('vc', person, g.product), key('vt', person, g.product)
      local nc, ns
      if write and cfg.sp_action ~= 'R' and cfg.rs_action ~= 'R' then
        -- Nothing can refuse: record first, then the window's counts are the sets' sizes.
        nc, ns = live_record(cfg, g, at, site)
        g.written = true
      else
        nc, ns = live_count(g, lo, site)
      end
      g.n = nc
      if nc >= cfg.sp_packs and ns >= cfg.sp_sites then
        add({m = 'STOCKPILING', v = cfg.sp_version, a = cfg.sp_action, k = nc, s = ns, g = g.product,
             w = cfg.sp_window / 3600000})
      end
    end
  end
  if cfg.rs_action ~= 'O' then
    local rkey = key('vr', person)
    local n = redis.call('ZCOUNT', rkey, at - cfg.rs_window, '+inf')
    local mine = {}
    for _, c in ipairs(credits) do
      if c[1] == person and not mine[c[2]] then
        mine[c[2]] = true
        if not redis.call('ZSCORE', rkey, c[2]) then n = n + 1 end
      end
    end
    if n >= cfg.rs_packs then
      add({m = 'RESALE_SOURCE', v = cfg.rs_version, a = cfg.rs_action, k = n, w = cfg.rs_window / 3600000})
    end
  end
  if write and not refusal then
    for _, g in ipairs(groups) do
      if not g.written then live_record(cfg, g, at, site) end
    end
  end
  return notices, refusal
end

-- Each notice in the audit stream (t = NOTICE; a refusal is t = REFUSED, x = the model): the
-- model in x, the packs in u, the product in g, the figures as json in f.
local function live_audit(stream, audit_max, site, sid, at_text, person, notices, refusal)
  for _, n in ipairs(notices) do
    if not refusal or n == refusal then
      audit_add(stream, audit_max, 't', refusal and 'REFUSED' or 'NOTICE', 'c', '', 's', site, 'i', sid, 'l', -1,
                'u', tostring(n.k), 'x', n.m, 'a', at_text, 'p', person, 'g', n.g or '', 'f', cjson.encode(n))
    end
  end
end


-- verify.lua calls live_hook(packs, credits) once it has judged a dispense and before it writes
-- anything (nil when the live rules are off): packs, the {issued product, code} of its recorded
-- OK lines; credits, the {first buyer's pseudonym, code} of its DUPLICATE lines at another site.
-- A refusal it returns is the script's answer (nothing marked).
local live_hook
local live_out

local function verify_body()
-- verify.lua: judge, and in dispense mode mark, the lines of one settlement in ONE atomic call.
--
-- The call covers one *part* of a settlement: on a single Redis node the whole settlement; on a
-- cluster the lines whose codes share one hash slot (store.py splits and merges).
--
-- KEYS[1]  part record (hash)               KEYS[2]  audit stream of the part's slot
-- then four keys per distinct code u = 1..U (keys.py): its issuance bucket (hash), the
--   tag's lot dictionary (hash), its state bucket (hash; the same key as the issuance bucket in
--   the live namespace, where one entry holds both), its history (list)
-- then, in a bulk job's namespace only, its registry (set) in the part's slot: every key this
--   call writes is added to it, so dropping the job unlinks what it wrote instead of scanning
--   the whole keyspace (store.py drop_namespace)
--
-- The positions below are those of tracecode.server.store.layout (spliced in as A, L and R).
-- ARGV[1]  mode: 'D' dispense (check, mark, audit, store results), 'C' check only (no writes), or
--          'P' prepare (one part of an ALL_OR_NOTHING settlement spanning slots: judge; when every
--          line is OK reserve the units until ARGV[12] ms from now instead of marking them;
--          commit.lua then confirms or releases the reservation)
-- ARGV[2]  site id               ARGV[3]  settlement id
-- ARGV[4]  settled_at, ms since the epoch        ARGV[5]  settlement date as YYYYMMDD (issuer's zone)
-- ARGV[6]  body digest (idempotency), packed (rules/packing.py)             ARGV[7]  policy: 'R' record accepted, 'A' all or nothing
-- ARGV[8]  audit stream max length (approximate trim)   ARGV[9] history max events per code
-- ARGV[10] settlement record ttl, seconds        ARGV[11] number of lines n
-- ARGV[12] dispense state ttl, seconds (0: none; a bulk REPLAY namespace expires, live state never);
--          in mode 'P' the reservation's lifetime, ms
--   An audit max of 0 writes no events (bulk REPLAY namespaces keep state, not history).
-- ARGV[13] the settlement's insured pseudonym packed (rules/packing.py), '' when none: what the
--          entries of the packs it dispenses first keep as their first buyer
-- ARGV[14] the site packed   ARGV[15] the settlement id packed (rules/packing.py id_field)
-- then five per line: code index u (0 = malformed), billed product id, units (0 = whole pack),
--   malformed reason, the line's 0-based index in the whole settlement
-- then the U canonical codes, in key order, then their U field names (rules/packing.py code_field).
--
-- Reservations live in the code's entry, field rv: json {"<site>\31<settlement>": [units, expires_ms,
-- settled_at_ms]}. Unexpired reservations of other settlements count as used units (and as the
-- first dispense of an unused pack) when judging; expired ones are ignored and pruned.
--
-- `insured` (the settlement's insured pseudonym, '' when none) is a local of gate.lua, which
-- store.py wraps this script in: the sanction gate runs in the same call.
--
-- Returns {replayed 0|1, results, part state}. results is what is stored for replays, packed in
--   the stored form (layout.py; results_encode): the recorded flag, then per line verdict, accepted, used_after,
--   pack_units, status, issued_product, expiry, first_site, first_settlement, first_at_ms,
--   attempts, reason, received_by (the site whose receiving check took the pack as stock: the
--   entry's rs, receive.lua). used_after, first_* and attempts describe the pack after the whole
--   settlement, on every line.
-- The part state is 'F' (final) or 'P' (prepared, awaiting commit.lua). A prepared part met again
-- in mode 'P' (a retry after its coordinator died before any decision was recorded) is judged
-- afresh against the state as it is now, its old reservation dropped: the state may have moved
-- on since (its reservation expired and another settlement took the pack), so its stored answer
-- is no longer true. The part record keeps, per code, the units used as read at preparation
-- ('pu'), so commit.lua can tell whether committing after the reservation expired is still safe.
-- Errors: "TCCONFLICT ..." when the settlement id was used with another body.

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


-- Verdict precedence, first wins: generated from tracecode.rules.verdicts.PRECEDENCE.
local PRECEDENCE = {'DUPLICATE_IN_REQUEST', 'UNKNOWN', 'BLOCKED', 'DUPLICATE', 'PRODUCT_MISMATCH', 'EXPIRED', 'QUANTITY_EXCEEDED'}

local mode, site, sid = ARGV[A.mode], ARGV[A.site], ARGV[A.settlement_id]
local at, day = inum(ARGV[A.settled_at_ms]), tonumber(ARGV[A.settle_day])
local digest, policy = ARGV[A.digest], ARGV[A.policy]
local audit_max, hist_max = tonumber(ARGV[A.audit_max]), tonumber(ARGV[A.history_max])
local ttl, n, state_ttl = tonumber(ARGV[A.settlement_ttl_s]), tonumber(ARGV[A.n_lines]), tonumber(ARGV[A.state_ttl])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local log_events = audit_max ~= 0  -- 0: a job's namespace (no events); < 0: archived (_audit.lua)
local writes = mode ~= 'C'
local CODE0 = LINE0 + STRIDE * n
local me = site .. '\31' .. sid
if mode == 'P' then policy = 'A' end
local KPC = 4
-- The codes, then their field names packed by the server (rules/packing.py: Redis is the shared
-- resource, the servers scale out): cfield finds each already made.
local U = (#ARGV - CODE0 + 1) / 2
for u = 1, U do CF[ARGV[CODE0 + u - 1]] = ARGV[CODE0 + U + u - 1] end
IDF[site], IDF[sid] = ARGV[A.site_packed], ARGV[A.settlement_packed]  -- packed by the server too
local registry = KEYS[2 + KPC * U + 1]
local written = {}  -- keys to register, when there is a registry

if writes then
  local prev = redis.call('HMGET', KEYS[1], 'd', 'r', 'ps')
  if prev[1] then
    if prev[1] ~= digest then
      return redis.error_reply('TCCONFLICT settlement id already used with a different request body')
    end
    if not (mode == 'P' and prev[3] == 'P') then return {1, prev[2], prev[3] or 'F'} end
  end
end

-- Check mode over a settlement recorded live (bulk CHECK of historical data): the packs it took
-- are its own, not duplicates of itself.
local own = {}
if mode == 'C' then
  local ledger = redis.call('HGET', KEYS[1], 'l')
  if ledger then
    for _, e in ipairs(ledger_read(ledger)) do
      if e[2] > 0 then own[e[1]] = true end
    end
  end
end

-- Per distinct code: issuance record (false when never issued), entry and dispense state, read once.
-- Tables indexed by code (1..U) or line (1..n) are made at their size at once (presized).
local rec, st, ent, orig_used = presized(U), presized(U), presized(U), presized(U)
local function load(u)
  if rec[u] ~= nil then return end
  local k = 2 + KPC * (u - 1)
  local code = ARGV[CODE0 + u - 1]
  local ie = entry_read(KEYS[k + 1], code)
  local r = issuance_of(KEYS[k + 2], ie)
  local e = ie
  if KEYS[k + 3] ~= KEYS[k + 1] then e = entry_read(KEYS[k + 3], code) end
  e = e or {}
  ent[u] = e
  if not r then
    rec[u] = false
    st[u] = {u = 0, fs = '', fi = '', fa = 0, at = 0, rv = nil}
  else
    rec[u] = r
    local rv = e[E.rv]
    st[u] = {u = inum(e[E.u]) or 0, fs = e[E.fs] or '', fi = e[E.fi] or '', fa = inum(e[E.fa]) or 0,
             at = inum(e[E.at]) or 0, rv = (rv and rv ~= '') and cjson.decode(rv) or nil}
    st[u].stored = st[u].u
    -- Units other settlements hold in reservation count as used while unexpired; on an unused
    -- pack the earliest of them stands as its first dispense.
    local s = st[u]
    if s.rv then
      for key, v in pairs(s.rv) do
        if v[2] > now and key ~= me then
          if s.u == 0 and (s.fa == 0 or v[3] < s.fa) then
            local sep = string.find(key, '\31', 1, true)
            s.fs, s.fi, s.fa = string.sub(key, 1, sep - 1), string.sub(key, sep + 1), v[3]
          end
          s.u = s.u + v[1]
          s.held = (s.held or 0) + v[1]
        end
      end
    end
  end
  orig_used[u] = st[u].u
end

local results = presized(n)
local seen, split_only, asked = presized(U), presized(U), presized(U)
local any_ok, any_flagged = false, false
local opened, duplicated = presized(U), presized(U)  -- per code: took units here / got a DUPLICATE verdict here

for i = 1, n do
  local a = LINE0 + STRIDE * (i - 1)
  local u, product, units = tonumber(ARGV[a + L.code_index]), ARGV[a + L.product_id], tonumber(ARGV[a + L.units])
  if u == 0 then
    results[i] = make_row{verdict = 'MALFORMED', accepted = 0, used = 0, pack_units = 0, status = '',
                          issued_product_id = '', expiry = 0, first_site_id = '', first_settlement_id = '',
                          first_settled_at_ms = 0, attempts = 0, reason = ARGV[a + L.malformed_reason],
                          received_by = ''}
    any_flagged = true
  else
    load(u)
    local r, s = rec[u], st[u]
    local want = units
    if r and want == 0 then want = r.n end
    -- Every condition that holds; the precedence table picks the verdict.
    local f = {}
    if seen[u] and not (r and units > 0 and split_only[u] and asked[u] + units <= r.n) then
      f.DUPLICATE_IN_REQUEST = true
    end
    if not r then
      f.UNKNOWN = true
    else
      if r.s ~= 'ACTIVE' then f.BLOCKED = true end
      -- A check of a settlement whose record has expired (settlement_ttl_days) still knows the
      -- pack's first dispense as its own when it was this settlement's.
      local mine = own[ARGV[CODE0 + u - 1]] or (mode == 'C' and sid ~= '' and s.fs == site and s.fi == sid)
      -- A used pack is a duplicate at any other site; at its own site a whole-pack line on a used-up
      -- pack is a resale too, while a split line there asks more than remains (QUANTITY_EXCEEDED).
      local whole = units == 0 or units == r.n
      if s.u > 0 and not mine and (s.fs ~= site or (whole and s.u >= r.n)) then f.DUPLICATE = true end
      if product ~= r.p then f.PRODUCT_MISMATCH = true end
      if r.e > 0 and r.e < day then f.EXPIRED = true end
      if want > r.n - s.u and not mine then f.QUANTITY_EXCEEDED = true end
    end
    seen[u] = true
    split_only[u] = (split_only[u] ~= false) and units > 0
    asked[u] = (asked[u] or 0) + units

    local verdict = 'OK'
    for _, v in ipairs(PRECEDENCE) do
      if f[v] then verdict = v; break end
    end
    local accepted = 0
    if verdict == 'OK' then
      -- A pack at zero units used starts a new use cycle: new first dispense, attempts from 0.
      if s.u == 0 then s.fs, s.fi, s.fa, s.at = site, sid, at, 0 end
      s.u = s.u + want
      accepted = want
      any_ok = true
      opened[u] = true
    else
      any_flagged = true
      -- Only a real dispense attempt counts; a read-only check reports the stored count.
      if verdict == 'DUPLICATE' and writes then
        s.at = s.at + 1
        duplicated[u] = true
      end
    end
    results[i] = make_row{verdict = verdict, accepted = accepted, used = 0, pack_units = r and r.n or 0,
                          status = r and r.s or '', issued_product_id = r and r.p or '', expiry = r and r.e or 0,
                          first_site_id = '', first_settlement_id = '', first_settled_at_ms = 0, attempts = 0,
                          reason = '', received_by = ent[u][E.rs] or '', code_index = u, want = want}
  end
end

local recorded = any_ok and not (policy == 'A' and any_flagged)

-- Every line reports its pack as it stands after this settlement (units used, first dispense,
-- attempts): the in-memory state when recorded, the stored state (plus logged attempts) when not.
for i = 1, n do
  local res = results[i]
  local u = res[R.code_index]
  if u then
    local s = st[u]
    if recorded then
      res[R.used], res[R.first_site_id], res[R.first_settlement_id], res[R.first_settled_at_ms] = s.u, s.fs, s.fi, s.fa
    else
      res[R.accepted], res[R.used] = 0, orig_used[u]
      if res[R.used] > 0 then
        res[R.first_site_id], res[R.first_settlement_id], res[R.first_settled_at_ms] = s.fs, s.fi, s.fa
      end
    end
    res[R.attempts] = s.at
  end
end

-- A prepared part reserves what its lines would take; commit.lua makes it a dispense.
local prepared = mode == 'P' and recorded
local part_state = prepared and 'P' or 'F'

-- The live rules (gate.lua live_hook), judged on what this dispense records, before any write:
-- a refusal leaves everything as it was. A person's state keeps the packs' codes packed (their
-- field names, rules/packing.py); a credit carries the canonical code too, for a cluster's
-- second call (gate.lua).
if live_hook and writes then
  local packs, credits = {}, {}
  for i = 1, n do
    local res = results[i]
    local u = res[R.code_index]
    if u then
      if res[R.verdict] == 'OK' then
        if recorded and not prepared then packs[#packs + 1] = {rec[u].p, ARGV[CODE0 + U + u - 1]} end
      elseif res[R.verdict] == 'DUPLICATE' and st[u].fs ~= site then
        local fp = ent[u][E.fp]
        if fp and fp ~= '' then
          credits[#credits + 1] = {h128_of(fp), ARGV[CODE0 + U + u - 1], ARGV[CODE0 + u - 1]}
        end
      end
    end
  end
  local refusal = live_hook(packs, credits)
  if refusal then return refusal end
end

if writes then
  local insured_packed = ARGV[A.buyer]  -- the first buyer as an entry keeps it (packed by the server)
  local dirty = presized(U)
  for u = 1, U do
    local e, s = ent[u], st[u]
    if mode == 'P' and ((prepared and opened[u]) or (s.rv and s.rv[me])) then
      -- Rebuilt: expired entries and this settlement's own earlier reservation dropped, its new
      -- one added when this judgement prepared the pack.
      local rv = {}
      for key, v in pairs(s.rv or {}) do
        if v[2] > now and key ~= me then rv[key] = v end
      end
      if prepared and opened[u] then rv[me] = {s.u - orig_used[u], now + state_ttl, at} end
      e[E.rv] = next(rv) == nil and '' or cjson.encode(rv)
      if s.at ~= 0 or duplicated[u] then e[E.at] = s.at end
      dirty[u] = true
    elseif recorded and opened[u] then
      -- Reserved units of others were only counted for judging: store this settlement's own,
      -- and on a pack nobody has dispensed yet it is the first dispense, not the reservation.
      local held = s.held or 0
      local fs, fi, fa = s.fs, s.fi, s.fa
      if orig_used[u] - held == 0 then fs, fi, fa = site, sid, at end
      e[E.u], e[E.fs], e[E.fi], e[E.fa], e[E.at] = s.u - held, fs, fi, fa, s.at
      -- The first buyer's pseudonym belongs to the first dispense (`insured`: see gate.lua).
      if fs == site and fi == sid then e[E.fp] = insured_packed end
      dirty[u] = true
    elseif duplicated[u] then
      e[E.at] = s.at
      dirty[u] = true
    end
  end

  local function event(u, i, etype, units, detail)
    if not log_events then return end
    local code = ARGV[CODE0 + u - 1]
    local li = inum(ARGV[LINE0 + STRIDE * (i - 1) + L.line_index])
    if rec[u] then
      local e, hkey = ent[u], KEYS[2 + KPC * (u - 1) + 4]
      if etype == 'DISPENSED' and not tonumber(e[E.fd]) then
        history_first(hkey, e, li, units, hist_max)  -- the common case, without an event table
      else
        history_push(hkey, e, {t = etype, a = at, s = site, i = sid, l = li, u = units, x = detail, p = insured},
                     hist_max)
      end
      dirty[u] = true
    end
    audit_add(KEYS[2], ARGV[A.audit_max], 't', etype, 'c', code, 's', site, 'i', sid, 'l', istr(li), 'u', istr(units),
              'x', detail, 'a', ARGV[A.settled_at_ms], 'p', insured, 'g', ARGV[LINE0 + STRIDE * (i - 1) + L.product_id])
  end

  -- Events in line order: dispenses when recorded, flagged attempts always (they are evidence).
  for i = 1, n do
    local res = results[i]
    local u = res[R.code_index]
    if u then
      if res[R.verdict] ~= 'OK' then
        event(u, i, 'ATTEMPT', res[R.want], res[R.verdict])
      elseif recorded and not prepared then
        event(u, i, 'DISPENSED', res[R.accepted], '')
      end
    end
  end

  -- Each touched entry written once, after its events (which count themselves in it).
  for u = 1, U do
    if dirty[u] then
      local skey = KEYS[2 + KPC * (u - 1) + 3]
      entry_write(skey, ARGV[CODE0 + u - 1], ent[u])
      if state_ttl > 0 and mode == 'D' then redis.call('EXPIRE', skey, state_ttl) end
      if registry then written[#written + 1] = skey end
    end
  end
end

-- Ledger for returns: per line, the code, the units it took, the units returned, its line index.
local ledger = presized(n)
for i = 1, n do
  local res = results[i]
  local u = res[R.code_index]
  ledger[i] = ledger_line(u and ARGV[CODE0 + u - 1] or '', res[R.accepted], 0,
                          ARGV[LINE0 + STRIDE * (i - 1) + L.line_index], i - 1)
  res[R.code_index], res[R.want] = nil, nil
end
-- Packed once, in the stored form (a first dispense that is this settlement's own as '='): the
-- answer and the record are the same text, decoded with the settlement's site, id and time.
local out = results_encode(recorded, results, {site, sid, at})
if writes then
  -- Packed (rules/packing.py): the digest in 22 characters (by the server), the time in 7; the
  -- site and the settlement id are the key's own (record_owner).
  redis.call('HSET', KEYS[1], 'd', digest, 'r', out, 'l', table.concat(ledger),
             'at', msf(at), 'ps', part_state)
  if prepared then
    local pu = {}
    for u = 1, U do
      if opened[u] then pu[ARGV[CODE0 + u - 1]] = st[u].stored end
    end
    redis.call('HSET', KEYS[1], 'pu', cjson.encode(pu))
  end
  redis.call('EXPIRE', KEYS[1], ttl)
  if registry then
    written[#written + 1] = KEYS[1]
    redis.call('SADD', registry, unpack(written))
    redis.call('EXPIRE', registry, math.max(ttl, state_ttl))
  end
end
return {0, out, part_state}

end

-- The argument layout (store/layout.py), for the gate's own reads of verify.lua's arguments.
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

-- The live rules (rules/live.py). 'J': judged here, in the settlement's own call (one node; the
-- person's keys and the first buyers' are named from the prefix, which one node allows). 'C': a
-- cluster, where they live in other slots: the first buyers of this call's DUPLICATEs ride on
-- the answer and the store judges the person in a second call (live.lua).
if live_cfg ~= '' then
  local cfg = live_parse(live_cfg)
  live_hook = function(packs, credits)
    if cfg.mode == 'C' then
      -- The first buyers and the canonical codes (the store packs them for live.lua).
      if #credits > 0 then
        local c = {}
        for i, cr in ipairs(credits) do c[i] = {cr[1], cr[3]} end
        live_out = {c = c}
      end
      return nil
    end
    local key = function(kind, p, product) return live_key(cfg, kind, p, product) end
    local at = tonumber(ARGV[A.settled_at_ms])
    local notices, refusal = live_judge(cfg, key, insured, ARGV[A.site], at, packs, credits, true)
    live_audit(KEYS[2], ARGV[A.audit_max], ARGV[A.site], ARGV[A.settlement_id], ARGV[A.settled_at_ms], insured,
               notices, refusal)
    if refusal then return redis.error_reply('TCLIVE ' .. cjson.encode(refusal)) end
    live_credit(cfg, key, at, credits)
    live_out = {n = notices}
    return nil
  end
end

if gate_mode == 'E' and ARGV[A.mode] == 'D' and redis.call('HEXISTS', KEYS[1], 'd') == 0 then
  local now = node_now()
  local found = binding(now)
  if #found > 0 then
    local first = cjson.decode(found[1])
    local why = first.j == 'SITE' and 'SITE_SANCTIONED' or 'INSURED_SANCTIONED'
    for _, v in ipairs(found) do
      local e = cjson.decode(v)
      if e.j == 'SITE' then first, why = e, 'SITE_SANCTIONED'; break end
    end
    audit_add(KEYS[2], ARGV[A.audit_max], 't', 'REFUSED', 'c', '',
               's', ARGV[A.site], 'i', ARGV[A.settlement_id], 'l', -1, 'u', 0, 'x', why, 'a', now, 'n', first.id, 'k', first.k, 'p', insured)
    return redis.error_reply('TCSANCTION ' .. cjson.encode(found))
  end
end
local answer = verify_body()
-- A prepared part (cluster ALL_OR_NOTHING over several slots) keeps the pseudonym for commit.lua.
if ARGV[A.mode] == 'P' and insured ~= '' then redis.call('HSET', KEYS[1], 'ip', insured) end
if live_out then
  -- The live rules' answer rides as a fifth element (json): {n = notices} or {c = credits}.
  answer[4] = answer[4] or ''
  answer[5] = cjson.encode(live_out)
end
if gate_mode == 'N' then
  local found = binding(node_now())
  -- The binding entries ride as a fourth element of the answer (json), beside the results.
  if #found > 0 then answer[4] = cjson.encode(found) end
end
return answer
