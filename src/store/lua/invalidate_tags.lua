-- Deletes every live entry carrying any of the tags, then the tag indexes.
-- KEYS: tag-index keys. ARGV: fill channel.
-- Returns: how many entries were deleted (each counted once).
local now = now_ms()
local deleted = 0
for _, index in ipairs(KEYS) do
  local entries = redis.call('ZRANGEBYSCORE', index, '(' .. now, '+inf')
  for _, e in ipairs(entries) do
    deleted = deleted + delete_entry(e, ARGV[1])
  end
  redis.call('DEL', index)
end
return deleted
