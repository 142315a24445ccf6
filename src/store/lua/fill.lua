-- Stores a value under a fill lease, only while that lease is current.
-- KEYS[1]: entry key, KEYS[2]: its lease key.
-- ARGV: fill channel, lease token, value, expiry mode ('PX' or 'PXAT'), ms,
--       then the entry's tag-index key names.
-- Returns: 1 when stored (waiters are woken), 0 when the lease is not current.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
write_entry(KEYS[1], ARGV[3], ARGV[4], ARGV[5], slice(ARGV, 6, #ARGV - 5), ARGV[1])
return 1
