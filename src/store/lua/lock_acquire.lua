-- Takes a lock if it is free, with a fresh fencing token.
-- KEYS[1]: lock key (hash), KEYS[2]: its fencing counter (no expiry).
-- ARGV: lease id, owner label, ttl ms.
-- Returns: {1, token} when taken; {0, pttl ms of the holder} when held.
--
-- A script: the check, the token and the grant must be one atomic step.
-- token = max(counter + 1, Redis clock in microseconds): it strictly
-- increases while the counter lives, and should the counter be lost (data
-- loss without persistence) the next token still exceeds every earlier one,
-- as long as Redis's clock has not gone back.
--
-- Run twice for the same attempt (a cluster client resending after a broken
-- connection), it answers the grant it already made, with the same token:
-- one attempt never takes two tokens or reports its own lease as held.
local holder = redis.call('HMGET', KEYS[1], 'lease', 'token')
if holder[1] == ARGV[1] then
  return {1, tonumber(holder[2])}
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('PTTL', KEYS[1])}
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
-- INCRBY keeps the arithmetic in Redis integers; the step is at least 1.
local token = redis.call('INCRBY', KEYS[2], math.max(1, now_us - last))
redis.call('HSET', KEYS[1], 'lease', ARGV[1], 'owner', ARGV[2], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, token}
