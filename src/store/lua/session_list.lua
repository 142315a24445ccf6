-- Lists a user's live sessions, pruning the index as it goes.
-- KEYS[1]: the user's index.
-- Returns: one {id, user, data, created ms, expires ms} per live session,
-- newest first.
local u = KEYS[1]
refresh_index(u, 0)
local out = {}
for _, s in ipairs(redis.call('ZREVRANGE', u, 0, -1)) do
  local fields = read_session(s)
  if fields then
    out[#out + 1] = session_row(s, fields)
  end
end
return out
