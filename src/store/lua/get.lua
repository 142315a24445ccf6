-- Reads entries with their remaining TTL.
-- KEYS: entry keys.
-- Returns: one {value or nil, pttl ms (-1: no expiry)} per key, in order.
-- A script rather than a pipeline so each value and its TTL belong together.
local out = {}
for i, e in ipairs(KEYS) do
  local value = redis.call('GET', e)
  if value then
    out[i] = {value, redis.call('PTTL', e)}
  else
    out[i] = {false, -2}
  end
end
return out
