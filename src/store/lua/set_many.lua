-- Writes many entries unconditionally.
-- KEYS: for each item, its entry key then its tag-index keys.
-- ARGV: fill channel, then for each item: value, ttl ms, number of tags.
-- Returns: the number of items written.
local now = now_ms()
local k = 1
local items = 0
for a = 2, #ARGV, 3 do
  local ntags = tonumber(ARGV[a + 2])
  write_entry(KEYS[k], ARGV[a], tonumber(ARGV[a + 1]), slice(KEYS, k + 1, ntags), now, ARGV[1])
  k = k + 1 + ntags
  items = items + 1
end
return items
