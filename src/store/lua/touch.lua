-- Gives an existing entry a new expiry.
-- KEYS[1]: entry key.
-- ARGV: 'PX' and a ttl ms, only if the entry has no tags; or 'PXAT' and the
--       Unix ms its tag indexes were given (the second call for a tagged
--       entry).
-- Returns: {0} when there is no entry; {1} when its expiry was set; {2, its
-- tag-index key names} when it has tags and 'PX' was asked: nothing was
-- changed, and the caller first extends those indexes, then calls again
-- with 'PXAT' (so an index never expires before its entries).
local e = KEYS[1]
if redis.call('EXISTS', e) == 0 then
  return {0}
end
local tags = e .. ':tags'
if ARGV[1] == 'PX' then
  local names = redis.call('SMEMBERS', tags)
  if #names > 0 then
    table.insert(names, 1, 2)
    return names
  end
  redis.call('PEXPIRE', e, ARGV[2])
  return {1}
end
redis.call('PEXPIREAT', e, ARGV[2])
redis.call('PEXPIREAT', tags, ARGV[2])
return {1}
