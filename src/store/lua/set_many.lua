-- Writes many entries of one hash slot unconditionally.
-- KEYS: the entry keys.
-- ARGV: fill channel, then for each entry: value, expiry mode ('PX' or
--       'PXAT'), ms, number of tags, that many tag-index key names.
-- Returns: the number of entries written.
local a = 2
for _, e in ipairs(KEYS) do
  local ntags = tonumber(ARGV[a + 3])
  write_entry(e, ARGV[a], ARGV[a + 1], ARGV[a + 2], slice(ARGV, a + 4, ntags), ARGV[1])
  a = a + 4 + ntags
end
return #KEYS
