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

--@AUDIT@--

--@LIVE@--

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
