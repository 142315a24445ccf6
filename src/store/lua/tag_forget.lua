-- Forgets index members an invalidation has dealt with, unless a write
-- re-recorded them meanwhile (their score then changed).
-- KEYS[1]: tag-index key.
-- ARGV: pairs of entry key and the score it was read with (compared as
--       numbers: scores are whole ms, exact in a double).
-- Returns: nothing.
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
