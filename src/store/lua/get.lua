-- Reads entries with their remaining TTL, copying a bounded number of value
-- bytes: every value through Lua costs Redis time (about 3 ms per MiB).
-- KEYS: entry keys.
-- ARGV[1]: byte budget. Values are read in order while the bytes read stay
--          within it, the first always; the read stops once the budget is
--          spent or at the first value that does not fit, which is dropped
--          (read in vain: at most one value per call, against a STRLEN for
--          every key, which took a fifth of Redis's time in a read of 100
--          small values).
-- Returns: a flat list. First every key's PTTL in ms, in order, packed as
-- little-endian 64-bit integers in one string (-1: no expiry, -2: a miss,
-- -3: left for another call, the one over the budget and every one after
-- it); then each key's value, in order ('' for a miss or a key left over).
-- The TTLs go packed because the service's RESP parser spends more on each
-- reply item than Redis does (about 800 instructions, callgrind): 100 keys
-- came back as 200 items, now 101. Flat, and no Lua false (a RESP3
-- client would read it as a boolean): nested tables cost Redis more CPU
-- than the reads themselves.
-- A script rather than a pipeline so each value and its TTL belong together.
local budget = tonumber(ARGV[1])
local used = 0
local out = {''}
local ttls = {}
local n = #KEYS
local i = 1
while i <= n and (i == 1 or used < budget) do
  local e = KEYS[i]
  local value = redis.call('GET', e)
  if value then
    used = used + #value
    if i > 1 and used > budget then
      break
    end
    out[i + 1] = value
    ttls[i] = redis.call('PTTL', e)
  else
    out[i + 1] = ''
    ttls[i] = -2
  end
  i = i + 1
end
for j = i, n do
  out[j + 1] = ''
  ttls[j] = -3
end
out[1] = struct.pack('<' .. string.rep('i8', n), unpack(ttls, 1, n))
return out
