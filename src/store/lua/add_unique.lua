-- Adds members to today's HyperLogLog (today in the configured time zone,
-- by Redis TIME).
-- KEYS[1]: the unique set's base (src/keys.rs stats_unique); the script
--   appends ':d:<day start ms>'.
-- ARGV: day retention ms; the clock table (stats_lib.lua); then the members.
-- Returns: 1 when the HyperLogLog changed, else 0.
-- A script because the day is picked from Redis TIME, and the expiry is set
-- in the same step.
local t = now_ms()
local clock, a = read_clock(2)
local d_start, d_end = day_of(clock, t)
local key = KEYS[1] .. ':d:' .. fmt(d_start)
local changed = 0
-- In chunks, so a large batch stays within Lua's unpack limit.
for i = a, #ARGV, 500 do
  changed = math.max(changed, redis.call('PFADD', key, unpack(ARGV, i, math.min(i + 499, #ARGV))))
end
redis.call('PEXPIREAT', key, fmt(d_end + tonumber(ARGV[1])))
return changed
