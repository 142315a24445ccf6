-- Adds deltas to counters: each to the current minute, hour and day bucket
-- and the all-time total.
-- KEYS: one counter base per delta (src/keys.rs stats_counter); the script
--   appends ':total', ':m:<ms>', ':h:<ms>', ':d:<ms>'.
-- ARGV: minute, hour, day retention ms; the clock table (stats_lib.lua);
--   then one amount per key (decimal int64; "0" only reads).
-- Returns: each counter's total right after its delta, in order (as
-- strings, so int64 totals above 2^53 stay exact); or {'overflow', k} when
-- delta k would take its total outside int64, in which case nothing changed.
-- A script so that every delta of the request lands in buckets of the same
-- Redis instant, in one round trip, with the expiry set in the same step.
local t = now_ms()
local clock, a = read_clock(4)
local m_start = t - t % 60000
local h_start, h_end = hour_of(clock, t)
local d_start, d_end = day_of(clock, t)
local buckets = {
  {':m:' .. fmt(m_start), fmt(m_start + 60000 + tonumber(ARGV[1]))},
  {':h:' .. fmt(h_start), fmt(h_end + tonumber(ARGV[2]))},
  {':d:' .. fmt(d_start), fmt(d_end + tonumber(ARGV[3]))},
}
-- Touch every key this script will write before writing any: should one
-- not be on this node (a slot being migrated), the script fails here, with
-- nothing written, and the call can be retried.
for _, base in ipairs(KEYS) do
  redis.call('EXISTS', base .. ':total', base .. buckets[1][1], base .. buckets[2][1], base .. buckets[3][1])
end
local out = {}
for k, base in ipairs(KEYS) do
  local amount = ARGV[a + k - 1]
  if amount == '0' then
    out[k] = redis.call('GET', base .. ':total') or '0'
  else
    local total = redis.pcall('INCRBY', base .. ':total', amount)
    if type(total) == 'table' and total.err then
      -- Only an overflow is the caller's; any other error (OOM under
      -- noeviction, a total that is not an integer) is raised after the undo.
      -- Undo in reverse; each of these INCRBYs succeeded, so each is exact.
      for j = k - 1, 1, -1 do
        local done = ARGV[a + j - 1]
        if done == '-9223372036854775808' then
          -- Its negation is no int64: add it back in two halves.
          redis.call('INCRBY', KEYS[j] .. ':total', '4611686018427387904')
          redis.call('INCRBY', KEYS[j] .. ':total', '4611686018427387904')
        elseif done ~= '0' then
          redis.call('DECRBY', KEYS[j] .. ':total', done)
        end
      end
      if string.find(total.err, 'overflow', 1, true) then
        return {'overflow', tostring(k)}
      end
      return redis.error_reply(total.err)
    end
    out[k] = redis.call('GET', base .. ':total')
  end
end
for k, base in ipairs(KEYS) do
  local amount = ARGV[a + k - 1]
  if amount ~= '0' then
    for _, b in ipairs(buckets) do
      local key = base .. b[1]
      redis.call('INCRBY', key, amount)
      redis.call('PEXPIREAT', key, b[2])
    end
  end
end
return out
