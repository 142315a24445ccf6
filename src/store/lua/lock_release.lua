-- Releases a lock held by the given lease and wakes its waiters.
-- KEYS[1]: lock key. ARGV: lease id, lock channel.
-- Returns: 1 when released, 0 when the lease is not the holder's.
-- A script: compare-and-delete must be atomic, or a release could delete a
-- lease granted to someone else in between.
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], KEYS[1])
return 1
