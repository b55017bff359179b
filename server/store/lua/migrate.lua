-- migrate.lua: move codes from layout 1 (an issuance hash, a dispense hash and a history list per
-- code) into layout 2 (one entry in a bucket hash, the lot in the tag's lot dictionary, history
-- beyond the first dispense), atomically per call: a code is either wholly in layout 1 or wholly
-- in layout 2, never half, so the migration can be stopped and run again at any point.
--
-- KEYS: six per code, all in one slot: layout 1 issuance, dispense, history (whose name layout 2
--   keeps for its history list), then layout 2 bucket, lot dictionary and batch index part.
-- ARGV: three per code, in key order: the canonical code, and the product and batch the caller
--   read from its issuance record (naming the batch index part).
-- Returns per code 1 migrated, 0 not now: no layout-1 issuance record (absent or already moved),
-- or its product or batch changed since the caller read them (a later run moves it).
--@LAYOUT@--
--@STATE@--

local out = {}
for j = 1, #ARGV / 3 do
  local k = 6 * (j - 1)
  local ikey, dkey, hkey, bkey, lkey = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local code = ARGV[3 * j - 2]
  local i = redis.call('HMGET', ikey, 'p', 'g', 'b', 'e', 'n', 'm', 's')
  if not i[1] or i[1] ~= ARGV[3 * j - 1] or (i[3] or '') ~= ARGV[3 * j] then
    out[j] = 0
  else
    local e = entry_read(bkey, code) or {}
    e[E.lot] = lot_id(lkey, lot_text(i[1], i[2] or '', i[3] or '', i[4] or '0', i[5] or '1', i[6] or ''))
    e[E.status] = (i[7] == nil or i[7] == 'ACTIVE') and '' or i[7]
    local d = {}
    local flat = redis.call('HGETALL', dkey)
    for f = 1, #flat, 2 do d[flat[f]] = flat[f + 1] end
    e[E.u], e[E.fs], e[E.fi], e[E.fa], e[E.at] = d.u or '', d.fs or '', d.fi or '', d.fa or '', d.at or ''
    e[E.fp], e[E.ev], e[E.rv] = d.fp or '', d.ev or '', d.rv or ''
    local fd = tonumber(d.fd)
    if fd then
      e[E.fd] = fd
      -- The first-ever dispense becomes implicit when it is the entry's current first dispense
      -- (the pack was never emptied by a return since): the list then drops it.
      local raw = redis.call('LINDEX', hkey, fd)
      local ev = raw and cjson.decode(raw)
      if ev and ev.t == 'DISPENSED' and (tonumber(d.u) or 0) > 0 and tonumber(ev.a) == tonumber(d.fa)
         and ev.s == d.fs and ev.i == d.fi and (ev.p or '') == (d.fp or '') and (ev.x or '') == '' then
        e[E.fl], e[E.fu], e[E.fx] = ev.l, ev.u, ''
        redis.call('LSET', hkey, fd, '\0drop')
        redis.call('LREM', hkey, 1, '\0drop')
      else
        e[E.fx] = '1'
      end
    end
    entry_write(bkey, code, e)
    if ARGV[3 * j] ~= '' then redis.call('HSET', KEYS[k + 6], code, '') end
    redis.call('DEL', ikey, dkey)
    out[j] = 1
  end
end
return out
