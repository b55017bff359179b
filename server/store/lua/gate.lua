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

--@AUDIT@--

--@LIVE@--

-- verify.lua calls live_hook(packs, credits) once it has judged a dispense and before it writes
-- anything (nil when the live rules are off): packs, the {issued product, code} of its recorded
-- OK lines; credits, the {first buyer's pseudonym, code} of its DUPLICATE lines at another site.
-- A refusal it returns is the script's answer (nothing marked).
local live_hook
local live_out

local function verify_body()
--@VERIFY@--
end

-- The argument layout (store/layout.py), for the gate's own reads of verify.lua's arguments.
--@LAYOUT@--

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
