-- Deletes the entries of one hash slot that are still tagged with any of
-- the invalidated tags (an entry rewritten without the tag is left alone).
-- KEYS: entry keys (read from the tag indexes).
-- ARGV: fill channel, then the invalidated tag-index key names.
-- Returns: how many entries were deleted.
local deleted = 0
for _, e in ipairs(KEYS) do
  local tagged = false
  for i = 2, #ARGV do
    if redis.call('SISMEMBER', e .. ':tags', ARGV[i]) == 1 then
      tagged = true
      break
    end
  end
  if tagged then
    deleted = deleted + delete_entry(e, ARGV[1])
  end
end
return deleted
