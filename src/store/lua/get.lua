-- Reads entries with their remaining TTL.
-- KEYS: entry keys.
-- Returns: a flat list with two items per key, in order: the value and its
-- PTTL in ms (-1: no expiry); a miss is '', -2. Flat, and no Lua false (a
-- RESP3 client would read it as a boolean): nested tables cost Redis more
-- CPU than the reads themselves.
-- A script rather than a pipeline so each value and its TTL belong together.
local values = redis.call('MGET', unpack(KEYS))
local out = {}
for i, e in ipairs(KEYS) do
  local value = values[i]
  if value then
    out[2 * i - 1] = value
    out[2 * i] = redis.call('PTTL', e)
  else
    out[2 * i - 1] = ''
    out[2 * i] = -2
  end
end
return out
