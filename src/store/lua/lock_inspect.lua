-- Reads who holds a lock.
-- KEYS[1]: lock key.
-- Returns: {1, owner, token, pttl ms} when held, {0} when free.
-- A script so the holder and its remaining time are read together.
local v = redis.call('HMGET', KEYS[1], 'owner', 'token')
if not v[2] then
  return {0}
end
return {1, v[1] or '', tonumber(v[2]), redis.call('PTTL', KEYS[1])}
