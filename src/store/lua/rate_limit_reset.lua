-- Clears rate-limit state keys of one hash slot.
-- KEYS: state keys (a caller key's fixed-window, sliding-window and
--       token-bucket states; the caller counts per caller key).
-- Returns: one 1/0 per key, in order: whether it existed.
-- A script rather than one DEL, to learn which keys existed in one round trip.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('DEL', key)
end
return out
