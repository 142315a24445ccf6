-- Writes one entry.
-- KEYS[1]: entry key; KEYS[2..]: tag-index keys of its new tags.
-- ARGV: fill channel, value, ttl ms, condition ('' always, 'NX' if absent,
--       'XX' if present).
-- Returns: 1 when written, 0 when the condition did not hold.
local e = KEYS[1]
local condition = ARGV[4]
if condition ~= '' then
  local exists = redis.call('EXISTS', e) == 1
  if (condition == 'NX' and exists) or (condition == 'XX' and not exists) then
    return 0
  end
end
write_entry(e, ARGV[2], tonumber(ARGV[3]), slice(KEYS, 2, #KEYS - 1), now_ms(), ARGV[1])
return 1
