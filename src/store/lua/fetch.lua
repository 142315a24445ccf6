-- One attempt of a stampede-safe read.
-- KEYS[1]: entry key, KEYS[2]: its lease key.
-- ARGV: a fresh lease token, lease lifetime ms.
-- Returns: {1, value, pttl} on a hit; {2} when this caller now holds the
-- lease; {3, lease pttl} when another caller holds it.
-- Run twice with the same token (a cluster client resending after a broken
-- connection), it answers {2} again rather than calling its own lease
-- someone else's.
local value = redis.call('GET', KEYS[1])
if value then
  return {1, value, redis.call('PTTL', KEYS[1])}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[2]) == ARGV[1] then
  return {2}
end
return {3, redis.call('PTTL', KEYS[2])}
