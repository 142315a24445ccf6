-- Ends all of a user's sessions, optionally keeping one.
-- KEYS[1]: the user's index; KEYS[2] (optional): the session to keep. It is
-- kept only if it is in this index, that is, a session of this user.
-- Returns: how many live sessions were deleted.
local u, keep = KEYS[1], KEYS[2]
on_this_node(u)
local deleted = 0
for _, s in ipairs(redis.call('ZRANGE', u, 0, -1)) do
  if s ~= keep then
    deleted = deleted + redis.call('DEL', s)
    redis.call('ZREM', u, s)
  end
end
refresh_index(u, 0)
return deleted
