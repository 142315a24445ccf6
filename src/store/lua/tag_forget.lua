-- Forgets index members an invalidation has dealt with, unless a write
-- re-recorded them meanwhile (their score then changed).
-- KEYS[1]: tag-index key.
-- ARGV: pairs of entry key and the score it was read with.
-- Returns: nothing.
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
