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

--@LAYOUT@--

--@STATE@--

-- Verdict precedence, first wins: generated from tracecode.rules.verdicts.PRECEDENCE.
local PRECEDENCE = {--@PRECEDENCE@--}

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
