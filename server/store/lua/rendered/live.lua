-- live.lua: the live rules of one person in their own slot (a Redis Cluster: the settlement's
-- codes live in other slots, so this is the settlement's one further call; on one node gate.lua
-- judges them inside the settlement's own call). lua/_live.lua holds the rules.
--
-- KEYS[1] the audit stream of the person's hash tag   KEYS[2] their RESALE_SOURCE zset
-- then per distinct product of the packs, in order of first appearance, their STOCKPILING
-- codes and sites zsets of it (all under rules.live.person_tag: one slot)
-- ARGV: the configuration (rules/live.py LiveRules.lua_arg), the operation, the pseudonym, site,
--   settlement id, settled_at ms, audit_max, P, then P pairs (issued product, code) of the
--   settlement's recorded OK lines, C, then C codes resold elsewhere that were first dispensed
--   to this person (credits).
-- Operations: 'J' credit, judge, audit and record (after the settlement); 'D' judge only, as if
--   the packs were recorded, and audit a refusal (before a settlement, when a rule refuses);
--   'W' credit only (a first buyer other than the settlement's person).
-- Returns the notices as json (a list), or the error "TCLIVE <refusal json>" ('D').

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


local cfg = live_parse(ARGV[1])
local op, person, site, sid, at_text, audit_max = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local at = tonumber(at_text)
local np = tonumber(ARGV[8])
local packs = {}
for i = 1, np do packs[i] = {ARGV[8 + 2 * i - 1], ARGV[8 + 2 * i]} end
local c0 = 9 + 2 * np
local credits = {}
for i = 1, tonumber(ARGV[c0]) do credits[i] = {person, ARGV[c0 + i]} end
local slots, n_products = {}, 0
for _, p in ipairs(packs) do
  if not slots[p[1]] then
    slots[p[1]] = {vc = KEYS[3 + 2 * n_products], vt = KEYS[4 + 2 * n_products]}
    n_products = n_products + 1
  end
end
local key = function(kind, _, product)
  if kind == 'vr' then return KEYS[2] end
  return slots[product][kind]
end

if op == 'J' then
  -- After the settlement was recorded a rule can no longer refuse it (the 'D' call before it
  -- did, when one held): what holds now is a notice.
  if cfg.sp_action == 'R' then cfg.sp_action = 'N' end
  if cfg.rs_action == 'R' then cfg.rs_action = 'N' end
end
if op == 'W' then
  live_credit(cfg, key, at, credits)
  return '[]'
end
local notices, refusal = live_judge(cfg, key, person, site, at, packs, credits, op == 'J')
if op == 'D' then
  if refusal then
    live_audit(KEYS[1], audit_max, site, sid, at_text, person, notices, refusal)
    return redis.error_reply('TCLIVE ' .. cjson.encode(refusal))
  end
  return '[]'
end
live_audit(KEYS[1], audit_max, site, sid, at_text, person, notices, nil)
live_credit(cfg, key, at, credits)
if #notices == 0 then return '[]' end
return cjson.encode(notices)
