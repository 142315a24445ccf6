-- Puts a token hash on the denylist until the token's own expiry.
-- KEYS[1]: the revocation key (named by the token's SHA-256).
-- ARGV: expires_at as Unix ms, the longest allowed TTL ms.
-- Returns: 1 stored (or extended), 0 when expires_at is already past
-- (nothing written), -1 when it is further ahead than the TTL limit.
-- A script so that "past" and "too far" are judged by Redis's clock, and so
-- that a second revocation keeps the later of the two instants.
local r = KEYS[1]
local at = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if at <= now then
  return 0
end
if at - now > tonumber(ARGV[2]) then
  return -1
end
if not redis.call('SET', r, '1', 'NX', 'PXAT', at) then
  redis.call('PEXPIREAT', r, at, 'GT')
end
return 1
