-- verify.lua: judge, and in dispense mode mark, the lines of one settlement in ONE atomic call.
--
-- KEYS[1]  settlement record (hash)         KEYS[2]  audit stream of the settlement's slot
-- then three keys per distinct code u = 1..U: issuance (hash), dispense state (hash), history (list)
--
-- ARGV[1]  mode: 'D' dispense (check, mark, audit, store results) or 'C' check only (no writes)
-- ARGV[2]  site id               ARGV[3]  settlement id
-- ARGV[4]  settled_at, ms since the epoch        ARGV[5]  settlement date as YYYYMMDD (issuer's zone)
-- ARGV[6]  body digest (idempotency)             ARGV[7]  policy: 'R' record accepted, 'A' all or nothing
-- ARGV[8]  audit stream max length (approximate trim)   ARGV[9] history max events per code
-- ARGV[10] settlement record ttl, seconds        ARGV[11] number of lines n
-- ARGV[12] dispense state ttl, seconds (0: none; a bulk REPLAY namespace expires, live state never)
--   An audit max of 0 writes no events (bulk REPLAY namespaces keep state, not history).
-- then four per line: code index u (0 = malformed), billed product id, units (0 = whole pack),
--   malformed reason
-- then the U canonical codes, in key order.
--
-- Returns {replayed 0|1, results-json}. results-json is what is stored for replays:
--   {"rec": 0|1, "l": [[verdict, accepted, used_after, pack_units, status, issued_product, expiry,
--                       first_site, first_settlement, first_at_ms, attempts, reason], ...]}
-- Errors: "TCCONFLICT ..." when the settlement id was used with another body.

-- Verdict precedence, first wins: generated from tracecode.server.verdicts.PRECEDENCE.
local PRECEDENCE = {--@PRECEDENCE@--}

local mode, site, sid = ARGV[1], ARGV[2], ARGV[3]
local at, day = tonumber(ARGV[4]), tonumber(ARGV[5])
local digest, policy = ARGV[6], ARGV[7]
local audit_max, hist_max, ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local n, state_ttl = tonumber(ARGV[11]), tonumber(ARGV[12])
local log_events = audit_max > 0
local LINE0 = 13
local CODE0 = LINE0 + 4 * n

if mode == 'D' then
  local prev = redis.call('HMGET', KEYS[1], 'd', 'r')
  if prev[1] then
    if prev[1] == digest then return {1, prev[2]} end
    return redis.error_reply('TCCONFLICT settlement id already used with a different request body')
  end
end

-- Check mode over a settlement recorded live (bulk CHECK of historical data): the packs it took
-- are its own, not duplicates of itself.
local own = {}
if mode == 'C' then
  local ledger = redis.call('HGET', KEYS[1], 'l')
  if ledger then
    for _, e in ipairs(cjson.decode(ledger)) do
      if e[2] > 0 then own[e[1]] = true end
    end
  end
end

-- Per distinct code: issuance record (false when never issued) and dispense state, read once.
local rec, st, orig_used = {}, {}, {}
local function load(u)
  if rec[u] ~= nil then return end
  local k = 2 + 3 * (u - 1)
  local r = redis.call('HMGET', KEYS[k + 1], 'p', 'n', 'e', 's')
  if not r[1] then
    rec[u] = false
    st[u] = {u = 0, fs = '', fi = '', fa = 0, at = 0}
  else
    rec[u] = {p = r[1], n = tonumber(r[2]) or 1, e = tonumber(r[3]) or 0, s = r[4] or 'ACTIVE'}
    local d = redis.call('HMGET', KEYS[k + 2], 'u', 'fs', 'fi', 'fa', 'at')
    st[u] = {u = tonumber(d[1]) or 0, fs = d[2] or '', fi = d[3] or '', fa = tonumber(d[4]) or 0,
             at = tonumber(d[5]) or 0}
  end
  orig_used[u] = st[u].u
end

local results, ok_lines, flagged_lines = {}, {}, {}
local seen, split_only, asked = {}, {}, {}
local any_flagged = false

for i = 1, n do
  local a = LINE0 + 4 * (i - 1)
  local u, product, units = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  if u == 0 then
    results[i] = {'MALFORMED', 0, 0, 0, '', '', 0, '', '', 0, 0, ARGV[a + 3]}
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
      local mine = own[ARGV[CODE0 + u - 1]]
      -- A used pack is a duplicate at any other site, and at its own site once fully used.
      if s.u > 0 and not mine and (s.fs ~= site or s.u >= r.n) then f.DUPLICATE = true end
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
      if s.u == 0 then s.fs, s.fi, s.fa = site, sid, at end
      s.u = s.u + want
      accepted = want
      ok_lines[#ok_lines + 1] = i
    else
      any_flagged = true
      if r then
        if verdict == 'DUPLICATE' then s.at = s.at + 1 end
      end
      flagged_lines[#flagged_lines + 1] = i
    end
    results[i] = {verdict, accepted, s.u, r and r.n or 0, r and r.s or '', r and r.p or '',
                  r and r.e or 0, s.fs, s.fi, s.fa, s.at, '', u, want}
  end
end

local recorded = #ok_lines > 0 and not (policy == 'A' and any_flagged)

if mode == 'D' then
  local function event(u, i, etype, units, detail)
    if not log_events then return end
    local k = 2 + 3 * (u - 1)
    local code = ARGV[CODE0 + u - 1]
    if rec[u] then
      redis.call('RPUSH', KEYS[k + 3], cjson.encode({t = etype, a = at, s = site, i = sid, l = i - 1,
                                                     u = units, x = detail}))
      redis.call('LTRIM', KEYS[k + 3], -hist_max, -1)
      redis.call('HINCRBY', KEYS[k + 2], 'ev', 1)
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', audit_max, '*', 't', etype, 'c', code, 's', site,
               'i', sid, 'l', i - 1, 'u', units, 'x', detail, 'a', at)
  end

  if recorded then
    local written = {}
    for _, i in ipairs(ok_lines) do
      local res = results[i]
      local u = res[13]
      if not written[u] then
        written[u] = true
        local s = st[u]
        local dkey = KEYS[2 + 3 * (u - 1) + 2]
        redis.call('HSET', dkey, 'u', s.u, 'fs', s.fs, 'fi', s.fi, 'fa', s.fa)
        if state_ttl > 0 then redis.call('EXPIRE', dkey, state_ttl) end
      end
      event(u, i, 'DISPENSED', res[2], '')
    end
  else
    -- Nothing recorded: report the state as it stands, not as it would have been.
    for i = 1, n do
      local res = results[i]
      if res[13] then
        res[2] = 0
        res[3] = orig_used[res[13]]
        if res[3] == 0 then res[8], res[9], res[10] = '', '', 0 end
      end
    end
  end
  for _, i in ipairs(flagged_lines) do
    local res = results[i]
    local u = res[13]
    if res[1] == 'DUPLICATE' then
      local dkey = KEYS[2 + 3 * (u - 1) + 2]
      redis.call('HSET', dkey, 'at', st[u].at)
      if state_ttl > 0 then redis.call('EXPIRE', dkey, state_ttl) end
    end
    event(u, i, 'ATTEMPT', res[14], res[1])
  end
end

-- Ledger for returns: per line, the code and the units it took.
local ledger = {}
for i = 1, n do
  local res = results[i]
  local u = res[13]
  ledger[i] = {u and ARGV[CODE0 + u - 1] or '', recorded and res[2] or 0, 0}
  res[13], res[14] = nil, nil
end
local out = cjson.encode({rec = recorded and 1 or 0, l = results})
if mode == 'D' then
  redis.call('HSET', KEYS[1], 'd', digest, 'r', out, 'l', cjson.encode(ledger), 'site', site, 'i', sid, 'at', at)
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {0, out}
