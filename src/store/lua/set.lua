-- Writes one entry.
-- KEYS[1]: entry key.
-- ARGV: fill channel, value, expiry mode ('PX' or 'PXAT'), ms, condition
--       ('' always, 'NX' if absent, 'XX' if present), then the entry's
--       tag-index key names.
-- Returns: 1 when written, 0 when the condition did not hold.
local e = KEYS[1]
local condition = ARGV[5]
if condition ~= '' then
  local exists = redis.call('EXISTS', e) == 1
  if (condition == 'NX' and exists) or (condition == 'XX' and not exists) then
    return 0
  end
end
write_entry(e, ARGV[2], ARGV[3], ARGV[4], slice(ARGV, 6, #ARGV - 5), ARGV[1])
return 1
