-- Sets a held lease to expire ttl ms from now.
-- KEYS[1]: lock key. ARGV: lease id, ttl ms, lock channel.
-- Returns: 1 when extended, 0 when the lease is not the holder's (an
-- expired lease is gone and is not revived).
-- A script: compare-and-expire must be atomic. A shortened lease wakes the
-- waiters, who sleep until the old expiry at the latest.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 0
end
local ttl = tonumber(ARGV[2])
local before = redis.call('PTTL', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ttl)
if ttl < before then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
return 1
