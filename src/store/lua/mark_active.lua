-- Records a member as seen now and trims members older than the longest
-- window.
-- KEYS[1]: the activity group (sorted set: member -> last seen, Unix ms).
-- ARGV[1]: the member; ARGV[2]: the longest window, ms.
-- Returns: 1.
-- A script so the score is Redis TIME and the trim and expiry happen in the
-- same step: the set holds only members seen within the longest window.
local function fmt(n)
  return string.format('%.0f', n)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], fmt(now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now - tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
