-- Deletes entries of one hash slot, their tag lists and their fill leases.
-- KEYS: entry keys. ARGV: fill channel.
-- Returns: how many entries existed.
local deleted = 0
for _, e in ipairs(KEYS) do
  deleted = deleted + delete_entry(e, ARGV[1])
end
return deleted
