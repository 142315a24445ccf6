-- Gives an existing entry (and its tag list) a new expiry.
-- KEYS[1]: entry key.
-- ARGV[1]: ttl ms.
-- Returns: {} when there is no entry; else {its new expiry (Unix ms), then
-- its tag-index key names}: the caller then records the new expiry in those
-- indexes (tag_index.lua), as after a write.
local e = KEYS[1]
on_this_node(e)
if redis.call('PEXPIRE', e, ARGV[1]) == 0 then
  return {}
end
local expiry = redis.call('PEXPIRETIME', e)
local tags = e .. ':tags'
local names = redis.call('SMEMBERS', tags)
if #names > 0 then
  redis.call('PEXPIREAT', tags, expiry)
end
table.insert(names, 1, expiry)
return names
