-- Writes many entries of one hash slot unconditionally.
-- KEYS: the entry keys.
-- ARGV: fill channel, then for each entry: value, ttl ms, number of tags,
--       that many tag-index key names.
-- Returns: each entry's expiry (Unix ms), in order.
for _, e in ipairs(KEYS) do
  on_this_node(e)
end
local expiries = {}
local a = 2
for i, e in ipairs(KEYS) do
  local ntags = tonumber(ARGV[a + 2])
  expiries[i] = write_entry(e, ARGV[a], ARGV[a + 1], slice(ARGV, a + 3, ntags), ARGV[1])
  a = a + 3 + ntags
end
return expiries
