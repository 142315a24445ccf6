-- Records written entries in tag indexes, after the entries are written.
-- KEYS: tag-index keys of one hash slot (sorted sets: member = entry key,
--       score = an instant no earlier than the entry's expiry, Unix ms).
-- ARGV: for each index: the number of entries n, then n pairs of entry key
--       and the entry's expiry (Unix ms, as its write script returned it).
-- Returns: nothing.
--
-- Every record gives its member a score higher than any the member had, and
-- a member new to the index a score higher than any the index ever gave
-- (kept in KEY..':floor', expiring with it): an invalidation that read a
-- member and then finds its score unchanged (tag_forget.lua) knows that no
-- write recorded it since, whatever was forgotten and re-added meanwhile.
-- So a score is the entry's expiry or, when that would not be higher, 1 ms
-- past the highest: an index never expires a member before its entry.
-- Up to 64 members whose score has passed are pruned per index and call (a
-- bounded step: an index of many dead members is pruned over several
-- writes), and the index expires with its last member: an index holds live
-- entries, plus deleted or untagged ones until their score passes or an
-- invalidation forgets them.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(x)
  return string.format('%.0f', x)
end
local a = 1
for _, index in ipairs(KEYS) do
  local floor_key = index .. ':floor'
  local floor = tonumber(redis.call('GET', floor_key) or '0')
  local top = floor
  local n = tonumber(ARGV[a])
  for i = 1, n do
    local e, expiry = ARGV[a + 2 * i - 1], tonumber(ARGV[a + 2 * i])
    local old = redis.call('ZSCORE', index, e)
    local score = math.max(expiry, (old and tonumber(old) or floor) + 1)
    redis.call('ZADD', index, ms(score), e)
    top = math.max(top, score)
  end
  a = a + 1 + 2 * n
  if top > now then
    redis.call('SET', floor_key, ms(top), 'PXAT', ms(top))
  end
  local dead = redis.call('ZRANGE', index, '-inf', '(' .. ms(now), 'BYSCORE', 'LIMIT', 0, 64)
  if #dead > 0 then
    redis.call('ZREM', index, unpack(dead))
  end
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if #last == 2 then
    redis.call('PEXPIREAT', index, last[2])
  end
end
return 0
