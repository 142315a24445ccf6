-- Shared helpers, concatenated in front of every session script.
--
-- Layout (src/keys.rs): a session S is a hash with the fields
--   id       the session id
--   user     the user id
--   data     the session data, a JSON object (plain text, any client reads it)
--   created  creation time, Unix ms
--   idle     the idle timeout, ms; a touch without a ttl slides by it
--   index    the key of its user's index
-- and expires (PEXPIREAT) when its idle timeout runs out. A user index U is a
-- sorted set: member = session key, score = creation time in µs, strictly
-- increasing per index so "oldest" is exact even within one millisecond.
-- Invariants kept by every script that changes U: each member is pruned once
-- its session is gone; U expires with its longest-lived session, or is
-- deleted when it has none left, so nothing of a user outlives the user's
-- sessions.
--
-- Scripts, not MULTI: each reads state (the session, its index, the clock)
-- and decides what to write from it, in one atomic step.

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Prunes index `u` of dead sessions, then evicts its oldest live ones until
-- at most `keep` are left (0: no limit), then makes `u` expire with its
-- longest-lived session, or deletes it when none is left.
-- Returns the ids of the evicted sessions, oldest first.
local function refresh_index(u, keep)
  local members = redis.call('ZRANGE', u, 0, -1)
  -- Every session is read before anything is written (see on_this_node).
  local expiries = {}
  for i, s in ipairs(members) do
    expiries[i] = redis.call('PEXPIRETIME', s)
  end
  local live = {}
  for i, s in ipairs(members) do
    local at = expiries[i]
    if at == -2 then
      redis.call('ZREM', u, s)
    else
      live[#live + 1] = {s, at}
    end
  end
  local evicted = {}
  local first = 1
  if keep > 0 and #live > keep then
    first = #live - keep + 1
    for i = 1, first - 1 do
      local s = live[i][1]
      evicted[#evicted + 1] = redis.call('HGET', s, 'id') or ''
      redis.call('DEL', s)
      redis.call('ZREM', u, s)
    end
  end
  if first > #live then
    redis.call('DEL', u)
    return evicted
  end
  local last = 0
  for i = first, #live do
    local at = live[i][2]
    -- -1: a session someone made persistent; the index must then persist too.
    if at == -1 then
      redis.call('PERSIST', u)
      return evicted
    end
    if at > last then
      last = at
    end
  end
  redis.call('PEXPIREAT', u, last)
  return evicted
end

-- A session's fields for the caller: {id, user, data, created ms, expires ms}.
local function session_row(s, fields)
  return {fields[1], fields[2], fields[3], tonumber(fields[4]), redis.call('PEXPIRETIME', s)}
end

-- Reads the index `u` a script will write, and its sessions, before the
-- script writes anything: on Redis Cluster, while the user's hash slot is
-- being migrated, a key already moved fails the script here, with nothing
-- written, and the call can be retried. (The index is reached through a
-- session's `index` field, not declared, so Redis cannot redirect the call
-- before it runs.)
local function on_this_node(u)
  for _, s in ipairs(redis.call('ZRANGE', u, 0, -1)) do
    redis.call('EXISTS', s)
  end
end

local SESSION_FIELDS = {'id', 'user', 'data', 'created', 'idle', 'index'}

-- Reads session `s`: its fields in SESSION_FIELDS order, or nil when it is gone.
local function read_session(s)
  local fields = redis.call('HMGET', s, unpack(SESSION_FIELDS))
  if not fields[1] then
    return nil
  end
  return fields
end
