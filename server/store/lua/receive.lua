-- receive.lua: the receiving check (入库核验) of one delivery's lines in ONE atomic call: judge
-- each pack as stock, and record the packs accepted as received by the site.
--
-- The call covers one part of a delivery: on a single Redis node the whole delivery; on a cluster
-- the lines whose codes share one hash slot (store.py splits them; a claim on the delivery's own
-- record, claim.lua's twin in store.receive, keeps one delivery id to one body first).
--
-- KEYS[1]  part record (hash)      KEYS[2]  audit stream of the part's slot
-- then two keys per distinct code u = 1..U: its bucket hash (the code's entry), the tag's lot
--   dictionary (keys.py)
-- ARGV: RECEIVE_ARGV (rules/schema.py, spliced as RA), then RECEIVE_LINE_FIELDS per line (RL),
--   then the U canonical codes.
--
-- A pack is judged as stock by the settlement's own checks, in PRECEDENCE order: a code twice in
-- the delivery (DUPLICATE_IN_REQUEST), never issued (UNKNOWN), blocked (BLOCKED), units of it
-- already dispensed at any site (DUPLICATE: a pack settled on insurance and offered again as
-- stock, 回流药), issued for another product than the delivery line says (PRODUCT_MISMATCH; only
-- when the line names one), expired on the day received (EXPIRED). An accepted pack's entry
-- records the receiving site (field rs), which verify.lua reports on every later sale of it.
--
-- Returns {replayed 0|1, text}: text is the stored answer, per line RS then the fields verdict,
-- status, issued product, expiry, first site, first settled_at ms, the site that had received it
-- before ('' none, or this site), reason; joined by US. Errors: "TCCONFLICT ..." when the
-- delivery id was used by this site with other lines.

--@LAYOUT@--

--@STATE@--

--@AUDIT@--

local PRECEDENCE = {--@PRECEDENCE@--}

local site, delivery, supplier = ARGV[RA.site], ARGV[RA.delivery_id], ARGV[RA.supplier]
local at, day = ARGV[RA.received_at_ms], tonumber(ARGV[RA.receive_day])
local digest, audit_max = ARGV[RA.digest], ARGV[RA.audit_max]
local ttl, n = tonumber(ARGV[RA.record_ttl_s]), tonumber(ARGV[RA.n_lines])
local RLINE0 = NRA + 1
local CODE0 = RLINE0 + RSTRIDE * n

local prev = redis.call('HMGET', KEYS[1], 'd', 'r')
if prev[1] then
  if prev[1] ~= digest then
    return redis.error_reply('TCCONFLICT delivery id already used by this site with other lines')
  end
  return {1, prev[2]}
end

local seen, rows, ent, rec = {}, {}, {}, {}
for i = 1, n do
  local a = RLINE0 + RSTRIDE * (i - 1)
  local u, product = tonumber(ARGV[a + RL.code_index]), ARGV[a + RL.product_id]
  local line = ARGV[a + RL.line_index]
  if u == 0 then
    rows[i] = table.concat({'MALFORMED', '', '', '0', '', '0', '', ARGV[a + RL.malformed_reason]}, US)
  else
    local k = 2 + 2 * (u - 1)
    local code = ARGV[CODE0 + u - 1]
    if ent[u] == nil then
      ent[u] = entry_read(KEYS[k + 1], code) or false
      rec[u] = issuance_of(KEYS[k + 2], ent[u] or nil)
    end
    local e, r = ent[u], rec[u]
    local f = {}
    if seen[u] then f.DUPLICATE_IN_REQUEST = true end
    seen[u] = true
    local used = e and (tonumber(e[E.u]) or 0) or 0
    if not r then
      f.UNKNOWN = true
    else
      if r.s ~= 'ACTIVE' then f.BLOCKED = true end
      if used > 0 then f.DUPLICATE = true end
      if product ~= '' and product ~= r.p then f.PRODUCT_MISMATCH = true end
      if r.e > 0 and r.e < day then f.EXPIRED = true end
    end
    local verdict = 'OK'
    for _, v in ipairs(PRECEDENCE) do
      if f[v] then verdict = v; break end
    end
    local before = e and e[E.rs] or ''
    if before == nil then before = '' end
    local fs, fa = '', '0'
    if verdict == 'DUPLICATE' then fs, fa = e[E.fs] or '', e[E.fa] or '0' end
    if verdict == 'OK' then
      e[E.rs] = site
      -- (packed in place into strings; the code cannot be OK again in this call: a second
      -- line of it is DUPLICATE_IN_REQUEST)
      entry_write(KEYS[k + 1], code, e)
      audit_add(KEYS[2], audit_max, 't', 'RECEIVED', 'c', code, 's', site, 'i', delivery, 'l', line, 'u', '1',
                'a', at, 'g', product, 'd', supplier)
    else
      audit_add(KEYS[2], audit_max, 't', 'RECEIVE_FLAGGED', 'c', code, 's', site, 'i', delivery, 'l', line,
                'u', '1', 'x', verdict, 'a', at, 'g', product, 'd', supplier)
    end
    rows[i] = table.concat({verdict, r and r.s or '', r and r.p or '', r and istr(r.e) or '0', fs, fa, before, ''}, US)
  end
end

local out = table.concat(rows, RS)
if n > 0 then out = RS .. out end
redis.call('HSET', KEYS[1], 'd', digest, 'r', out, 'site', site, 'i', delivery, 'at', at)
redis.call('EXPIRE', KEYS[1], ttl)
return {0, out}
