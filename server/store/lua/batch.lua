-- batch.lua: the codes of one batch among some bucket hashes of one hash tag (what a recall
-- changes). There is no per-code batch index: it cost as much memory as the codes' own entries
-- (docs/scaling.md), while a recall is rare and a scan of the tag's buckets finds the codes by
-- their lot id. The status script judges every code found again (status.lua's `only`), atomically.
--
-- KEYS[1] the tag's lot dictionary   then bucket hashes of that tag
-- ARGV[1] product id   ARGV[2] batch
-- Returns the field names (packed codes, rules/packing.py) whose entry's lot is of that product
-- and batch.
--@LAYOUT@--
--@STATE@--

local product, batch = ARGV[1], ARGV[2]
local want, any = {}, false
local lots = redis.call('HGETALL', KEYS[1])
for i = 1, #lots, 2 do
  local id = lots[i]
  if id ~= '#' and sub(id, 1, 1) ~= '=' then  -- the counter and the content index are not lots
    local l = split(lots[i + 1], US, new_lot())
    if l[LT.product_id] == product and l[LT.batch] == batch then
      want[id], any = true, true
    end
  end
end
if not any then return {} end
local out = {}
for k = 2, #KEYS do
  local h = redis.call('HGETALL', KEYS[k])
  for i = 1, #h, 2 do
    local v = h[i + 1]
    local sep = string.find(v, US, 1, true)
    if want[sep and sub(v, 1, sep - 1) or v] then out[#out + 1] = h[i] end
  end
end
return out
