-- Gives back what a Check consumed from limits of one hash slot, after
-- another slot's limits denied the same Check (Redis Cluster: limits in
-- different slots cannot be one script). The refund never gives back more
-- than was taken, so a Check split across slots may briefly over-deny,
-- never over-admit.
-- KEYS: the state keys the Check consumed from.
-- ARGV[1]: cost; then four per limit: algorithm ('f', 's', 't'), limit,
--       period ms, the window the Check counted in (from its reply).
-- Returns: nothing.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local cost = tonumber(ARGV[1])

local function int(x)
  return string.format('%.0f', x)
end

for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 4
  local algorithm, limit, period, w =
    ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  if algorithm == 'f' then
    -- Only the window it was counted in; a later window never saw it.
    local s = redis.call('HMGET', key, 'w', 'n')
    if tonumber(s[1]) == w then
      redis.call('HSET', key, 'n', int(math.max(0, (tonumber(s[2]) or 0) - cost)))
    end
  elseif algorithm == 's' then
    local s = redis.call('HMGET', key, 'w', 'c', 'p')
    local w0 = tonumber(s[1])
    if w0 == w then
      redis.call('HSET', key, 'c', int(math.max(0, (tonumber(s[2]) or 0) - cost)))
    elseif w0 == w + 1 then
      -- The window moved on: what was counted is now the previous count.
      redis.call('HSET', key, 'p', int(math.max(0, (tonumber(s[3]) or 0) - cost)))
    end
  elseif algorithm == 't' then
    local s = redis.call('HMGET', key, 't', 'd')
    local t0, d0 = tonumber(s[1]), tonumber(s[2])
    if t0 and d0 then
      local debt = math.max(0, d0 - math.max(0, now - t0) * limit)
      debt = math.max(0, debt - cost * period)
      if debt == 0 then
        redis.call('DEL', key)
      else
        redis.call('HSET', key, 't', int(now), 'd', int(debt))
        redis.call('PEXPIRE', key, int(math.ceil(debt / limit)))
      end
    end
  end
end
