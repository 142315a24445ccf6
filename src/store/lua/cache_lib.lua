-- Shared helpers, concatenated in front of every cache write script.
--
-- Layout (src/keys.rs): an entry key E is a string; E..':lease' holds its
-- fill lease token; E..':tags' is the set of tag-index keys the entry is in.
-- A tag index is a sorted set: member = entry key, score = entry expiry (Unix
-- ms), and the index itself expires when its last member does, so tag
-- bookkeeping never outlives the entries.
--
-- Scripts, not MULTI: each write reads state (old tags, the lease, a
-- condition) and decides what to write from it, in one atomic step.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Removes entry `e` from every tag index it is in and forgets its tags.
local function untag(e)
  local tags_key = e .. ':tags'
  local indexes = redis.call('SMEMBERS', tags_key)
  for _, index in ipairs(indexes) do
    redis.call('ZREM', index, e)
  end
  if #indexes > 0 then
    redis.call('DEL', tags_key)
  end
end

-- Voids entry `e`'s fill lease, if any, and wakes the callers waiting on it:
-- they read again and find the new state.
local function void_lease(e, channel)
  if redis.call('DEL', e .. ':lease') == 1 then
    redis.call('PUBLISH', channel, e)
  end
end

-- Makes index `index` expire with its longest-lived member, pruning the dead.
local function refresh_index(index, now)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  local last = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
  if #last == 2 then
    redis.call('PEXPIREAT', index, last[2])
  end
end

-- Sets entry `e` to expire at `expiry` and records that in its tag indexes.
local function expire_tags(e, indexes, expiry, now)
  if #indexes == 0 then
    return
  end
  redis.call('SADD', e .. ':tags', unpack(indexes))
  redis.call('PEXPIREAT', e .. ':tags', expiry)
  for _, index in ipairs(indexes) do
    redis.call('ZADD', index, expiry, e)
    refresh_index(index, now)
  end
end

-- Writes entry `e` with a TTL and tag indexes (replacing any it had), then
-- voids its fill lease.
local function write_entry(e, value, ttl_ms, indexes, now, channel)
  untag(e)
  redis.call('SET', e, value, 'PX', ttl_ms)
  expire_tags(e, indexes, now + ttl_ms, now)
  void_lease(e, channel)
end

-- Deletes entry `e` with its tags and lease; returns 1 if it existed.
local function delete_entry(e, channel)
  untag(e)
  void_lease(e, channel)
  return redis.call('DEL', e)
end

-- Returns ARGV[from .. from+count-1] / KEYS[...] as a new list.
local function slice(list, from, count)
  local out = {}
  for i = 1, count do
    out[i] = list[from + i - 1]
  end
  return out
end
