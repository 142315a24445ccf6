-- Gives an existing entry a new TTL, keeping its tag indexes in step so an
-- invalidation still finds it until it expires.
-- KEYS[1]: entry key. ARGV: ttl ms.
-- Returns: 1 when the entry existed, else 0.
local e = KEYS[1]
local ttl = tonumber(ARGV[1])
if redis.call('PEXPIRE', e, ttl) == 0 then
  return 0
end
local indexes = redis.call('SMEMBERS', e .. ':tags')
local now = now_ms()
expire_tags(e, indexes, now + ttl, now)
return 1
