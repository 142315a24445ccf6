-- Reads entries with their remaining TTL, copying a bounded number of value
-- bytes: every value through Lua costs Redis time (about 3 ms per MiB).
-- KEYS: entry keys.
-- ARGV[1]: byte budget. The first key's value is always read; a later one
--          only while the values read so far plus it fit the budget.
-- Returns: a flat list with two items per key, in order: the value and its
-- PTTL in ms (-1: no expiry); a miss is '', -2; a value left for another
-- call (over the budget) is '', -3. Flat, and no Lua false (a RESP3 client
-- would read it as a boolean): nested tables cost Redis more CPU than the
-- reads themselves.
-- A script rather than a pipeline so each value and its TTL belong together.
local budget = tonumber(ARGV[1])
local used = 0
local out = {}
for i, e in ipairs(KEYS) do
  -- The first key needs no size check (and a lone Get no STRLEN).
  if i > 1 and used + redis.call('STRLEN', e) > budget then
    out[2 * i - 1] = ''
    out[2 * i] = -3
  else
    local value = redis.call('GET', e)
    if value then
      used = used + #value
      out[2 * i - 1] = value
      out[2 * i] = redis.call('PTTL', e)
    else
      out[2 * i - 1] = ''
      out[2 * i] = -2
    end
  end
end
return out
