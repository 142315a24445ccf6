-- Clears the rate-limit state of caller keys, whatever algorithm they used.
-- KEYS: three per caller key: its fixed-window, sliding-window and
--       token-bucket state keys.
-- Returns: how many caller keys had any state (a repeated key counts once).
-- A script rather than one DEL, to count per caller key in one round trip.
local reset = 0
for i = 1, #KEYS, 3 do
  if redis.call('DEL', KEYS[i], KEYS[i + 1], KEYS[i + 2]) > 0 then
    reset = reset + 1
  end
end
return reset
