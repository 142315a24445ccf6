-- Stores a value under a fill lease, only while that lease is current.
-- KEYS[1]: entry key, KEYS[2]: its lease key, KEYS[3..]: tag-index keys.
-- ARGV: fill channel, lease token, value, ttl ms.
-- Returns: 1 when stored (waiters are woken), 0 when the lease is not current.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
write_entry(KEYS[1], ARGV[3], tonumber(ARGV[4]), slice(KEYS, 3, #KEYS - 2), now_ms(), ARGV[1])
return 1
