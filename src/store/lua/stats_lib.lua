-- Shared helpers, concatenated in front of the Stats scripts that pick a
-- bucket of Redis TIME (increment.lua, add_unique.lua).
--
-- A clock table (src/calendar.rs, Calendar::clock_table) travels in ARGV as:
--   D, D local day starts (Unix ms, ascending), S, S pairs (from ms, offset ms)
-- Day j is [days[j], days[j+1]); from `from` on, local time is UTC + offset.
-- Rust computes it from its own clock around now; the script applies it to
-- Redis TIME, so the bucket follows Redis's clock and the zone's rules, DST
-- included, in one round trip. The rules match Calendar::bucket_start.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers as digits (tostring would switch to exponent notation).
local function fmt(n)
  return string.format('%.0f', n)
end

-- Reads the clock table starting at ARGV[i]; returns it and the next index.
local function read_clock(i)
  local days, offsets = {}, {}
  local n = tonumber(ARGV[i])
  for j = 1, n do
    days[j] = tonumber(ARGV[i + j])
  end
  i = i + n + 1
  n = tonumber(ARGV[i])
  for j = 1, n do
    offsets[j] = {tonumber(ARGV[i + 2 * j - 1]), tonumber(ARGV[i + 2 * j])}
  end
  return {days = days, offsets = offsets}, i + 2 * n + 1
end

-- The start and end of the local day containing t.
local function day_of(clock, t)
  local days = clock.days
  for j = #days - 1, 1, -1 do
    if days[j] <= t then
      if t < days[j + 1] then
        return days[j], days[j + 1]
      end
      break
    end
  end
  error({err = 'ERR stats clock table does not cover Redis TIME ' .. fmt(t)})
end

-- The start and end of the local hour containing t.
local function hour_of(clock, t)
  local offset
  for _, o in ipairs(clock.offsets) do
    if o[1] <= t then
      offset = o[2]
    end
  end
  if offset == nil then
    error({err = 'ERR stats clock table does not cover Redis TIME ' .. fmt(t)})
  end
  local start = math.floor((t + offset) / 3600000) * 3600000 - offset
  return start, start + 3600000
end
