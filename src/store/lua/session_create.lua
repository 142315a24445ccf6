-- Creates a session, adds it to its user's index and, with a cap, evicts the
-- user's oldest sessions beyond it, all in one step.
-- KEYS[1]: the new session's key; KEYS[2]: its user's index.
-- ARGV: session id, user id, data (JSON object), idle timeout ms, cap (0: none).
-- Returns: {1, created ms, expires ms, {evicted ids, oldest first}}, or {0}
-- when the id is taken (the caller draws another).
local s, u = KEYS[1], KEYS[2]
if redis.call('EXISTS', s) == 1 then
  return {0}
end
on_this_node(u)
local now = now_us()
local created = math.floor(now / 1000)
local idle = tonumber(ARGV[4])
local expires = created + idle
redis.call('HSET', s, 'id', ARGV[1], 'user', ARGV[2], 'data', ARGV[3], 'created', created, 'idle', idle, 'index', u)
redis.call('PEXPIREAT', s, expires)
local newest = redis.call('ZRANGE', u, -1, -1, 'WITHSCORES')
local score = now
if #newest == 2 and tonumber(newest[2]) >= score then
  score = tonumber(newest[2]) + 1
end
redis.call('ZADD', u, score, s)
local evicted = refresh_index(u, tonumber(ARGV[5]))
return {1, created, expires, evicted}
