-- read.lua: one code's issuance, state and kept events, read in one consistent step:
-- the lot id is inside the entry, so reading the lot in a second round trip could meet a changed
-- entry.
--
-- KEYS[1] the code's bucket   KEYS[2] the tag's lot dictionary   KEYS[3] its history
-- ARGV[1] the canonical code  ARGV[2] '1' to read the history list too
-- Returns {entry or '', lot or '', {events...}}, raw as stored (the store decodes them).
--@LAYOUT@--
--@STATE@--
local e = redis.call('HGET', KEYS[1], cfield(ARGV[1]))
if not e then return {'', '', {}} end
local lot = ''
local sep = string.find(e, '\31', 1, true)
local id = sep and string.sub(e, 1, sep - 1) or e
if id ~= '' then lot = redis.call('HGET', KEYS[2], id) or '' end
local events = {}
if ARGV[2] == '1' then events = redis.call('LRANGE', KEYS[3], 0, -1) end
return {e, lot, events}
