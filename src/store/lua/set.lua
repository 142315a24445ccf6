-- Writes one entry.
-- KEYS[1]: entry key.
-- ARGV: fill channel, value, ttl ms, condition ('' always, 'NX' if absent,
--       'XX' if present), then the entry's tag-index key names.
-- Returns: the entry's expiry (Unix ms) when written, 0 when the condition
-- did not hold.
local e = KEYS[1]
on_this_node(e)
local condition = ARGV[4]
if condition ~= '' then
  local exists = redis.call('EXISTS', e) == 1
  if (condition == 'NX' and exists) or (condition == 'XX' and not exists) then
    return 0
  end
end
return write_entry(e, ARGV[2], ARGV[3], slice(ARGV, 5, #ARGV - 4), ARGV[1])
