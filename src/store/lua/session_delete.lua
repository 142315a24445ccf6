-- Ends one session and removes it from its user's index.
-- KEYS[1]: session key.
-- Returns: 1 when a live session was deleted, else 0.
local s = KEYS[1]
local u = redis.call('HGET', s, 'index')
if u then
  on_this_node(u)
end
if redis.call('DEL', s) == 0 then
  return 0
end
if u then
  redis.call('ZREM', u, s)
  refresh_index(u, 0)
end
return 1
