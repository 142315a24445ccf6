-- Records entries in tag indexes, before the entries are written.
-- KEYS: tag-index keys of one hash slot (sorted sets: member = entry key,
--       score = the entry's expiry, Unix ms).
-- ARGV: for each index: the number of entries n, then n pairs of entry key
--       and ttl ms.
-- Returns: Redis's time now, Unix ms. Each member's score is now + ttl;
-- the caller then writes each entry to expire at the earliest such instant
-- over the index calls (PXAT), so no index member expires before its entry.
-- Scores only grow (GT), so a shorter rewrite never hides a longer-lived
-- entry from an invalidation. Up to 64 members whose score has passed are
-- pruned per index and call (a bounded step: an index of many dead members
-- is pruned over several writes), and the index expires with its last
-- member: an index holds live entries, plus deleted or untagged ones from
-- their old expiry until pruned.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local a = 1
for _, index in ipairs(KEYS) do
  local n = tonumber(ARGV[a])
  for i = 1, n do
    local e, ttl = ARGV[a + 2 * i - 1], tonumber(ARGV[a + 2 * i])
    redis.call('ZADD', index, 'GT', string.format('%.0f', now + ttl), e)
  end
  a = a + 1 + 2 * n
  local dead = redis.call('ZRANGE', index, '-inf', '(' .. string.format('%.0f', now), 'BYSCORE', 'LIMIT', 0, 64)
  if #dead > 0 then
    redis.call('ZREM', index, unpack(dead))
  end
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if #last == 2 then
    redis.call('PEXPIREAT', index, last[2])
  end
end
return now
