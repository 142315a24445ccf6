-- Reads a session and optionally slides its idle timeout (GetSession with
-- touch, TouchSession).
-- KEYS[1]: session key.
-- ARGV: '1' to touch, '0' to only read; the new idle timeout ms ('' keeps the
-- session's own).
-- Returns: {id, user, data, created ms, expires ms}, or {} when not found.
local s = KEYS[1]
local fields = read_session(s)
if not fields then
  return {}
end
if ARGV[1] == '1' then
  if fields[6] then
    on_this_node(fields[6])
  end
  local before = redis.call('PEXPIRETIME', s)
  local idle = tonumber(fields[5])
  if ARGV[2] ~= '' then
    idle = tonumber(ARGV[2])
    redis.call('HSET', s, 'idle', idle)
  end
  local expires = math.floor(now_us() / 1000) + idle
  redis.call('PEXPIREAT', s, expires)
  -- Keep the index expiring no earlier than its longest-lived session (and
  -- no later, when this one was the longest-lived and now ends sooner).
  local u = fields[6]
  if u then
    if not redis.call('ZSCORE', u, s) then
      -- Only a hand-deleted index gets here; put the session back in it.
      redis.call('ZADD', u, tonumber(fields[4]) * 1000, s)
    end
    local until_ms = redis.call('PEXPIRETIME', u)
    if until_ms >= 0 and expires > until_ms then
      redis.call('PEXPIREAT', u, expires)
    elseif until_ms == -2 or (expires < until_ms and before >= until_ms) then
      refresh_index(u, 0)
    end
  end
end
return session_row(s, fields)
