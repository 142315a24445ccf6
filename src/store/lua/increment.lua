-- Adds deltas to counters: each to the current minute, hour and day bucket
-- and the all-time total.
-- KEYS: one counter base per delta (src/keys.rs stats_counter); the script
--   appends ':total', ':m:<ms>', ':h:<ms>', ':d:<ms>'.
-- ARGV: minute, hour, day retention ms; the clock table (stats_lib.lua);
--   then one amount per key (decimal int64; "0" only reads).
-- Returns: each counter's total right after its delta, in order (as
-- strings, so int64 totals above 2^53 stay exact).
-- A script so that every delta of the request lands in buckets of the same
-- Redis instant, in one round trip, with the expiry set in the same step.
local t = now_ms()
local clock, a = read_clock(4)
local m_start = t - t % 60000
local h_start, h_end = hour_of(clock, t)
local d_start, d_end = day_of(clock, t)
-- Suffix and expiry (bucket end + retention) of the three buckets.
local buckets = {
  {':m:' .. fmt(m_start), fmt(m_start + 60000 + tonumber(ARGV[1]))},
  {':h:' .. fmt(h_start), fmt(h_end + tonumber(ARGV[2]))},
  {':d:' .. fmt(d_start), fmt(d_end + tonumber(ARGV[3]))},
}
local out = {}
for k, base in ipairs(KEYS) do
  local amount = ARGV[a + k - 1]
  local total = base .. ':total'
  if amount ~= '0' then
    -- The total first: if it cannot change (int64 overflow), no bucket has.
    redis.call('INCRBY', total, amount)
    for _, b in ipairs(buckets) do
      local key = base .. b[1]
      redis.call('INCRBY', key, amount)
      redis.call('PEXPIREAT', key, b[2])
    end
  end
  out[k] = redis.call('GET', total) or '0'
end
return out
