-- Stores a value under a fill lease, only while that lease is current.
-- KEYS[1]: entry key, KEYS[2]: its lease key.
-- ARGV: fill channel, lease token, value, ttl ms, then the entry's
--       tag-index key names.
-- Returns: the entry's expiry (Unix ms) when stored (waiters are woken), 0
-- when the lease is not current.
on_this_node(KEYS[1])
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
return write_entry(KEYS[1], ARGV[3], ARGV[4], slice(ARGV, 5, #ARGV - 4), ARGV[1])
