-- Shared helpers, concatenated in front of every cache write script.
--
-- Layout (src/keys.rs): an entry key E is a string; E..':lease' holds its
-- fill lease token; E..':tags' is the set of the tag-index key names the
-- entry was written with, expiring with it. Both share E's hash tag, so they
-- are in E's slot. Tag indexes live in the tags' own slots and are kept by
-- separate calls (tag_index.lua after the write, invalidate_entries.lua): a
-- script never reaches outside its entry's slot.
--
-- Scripts, not MULTI: each write reads state (the lease, a condition) and
-- decides what to write from it, in one atomic step.

-- Touches entry `e`'s keys before anything is written: while its hash slot
-- is being migrated between cluster nodes, a key already moved fails the
-- script here, with nothing written, and the call can be retried.
local function on_this_node(e)
  redis.call('EXISTS', e, e .. ':lease', e .. ':tags')
end

-- Voids entry `e`'s fill lease, if any, and wakes the callers waiting on it:
-- they read again and find the new state.
local function void_lease(e, channel)
  if redis.call('DEL', e .. ':lease') == 1 then
    redis.call('PUBLISH', channel, e)
  end
end

-- Drops entry `e`'s tag list. UNLINK: a list of many tags is freed by a
-- background thread, not inside this script.
local function unlink_tags(e)
  redis.call('UNLINK', e .. ':tags')
end

-- Writes entry `e` to expire in `ttl` ms with the names of its tag indexes
-- (replacing any it had), then voids its fill lease. Returns the entry's
-- expiry, Unix ms: the caller records a tagged entry in its indexes after
-- this, at that expiry (see tag_index.lua).
local function write_entry(e, value, ttl, tags, channel)
  redis.call('SET', e, value, 'PX', ttl)
  unlink_tags(e)
  local expiry = redis.call('PEXPIRETIME', e)
  if #tags > 0 then
    redis.call('SADD', e .. ':tags', unpack(tags))
    redis.call('PEXPIREAT', e .. ':tags', expiry)
  end
  void_lease(e, channel)
  return expiry
end

-- Deletes entry `e` with its tags and lease; returns 1 if it existed.
local function delete_entry(e, channel)
  unlink_tags(e)
  void_lease(e, channel)
  return redis.call('DEL', e)
end

-- Returns list[from .. from+count-1] as a new list.
local function slice(list, from, count)
  local out = {}
  for i = 1, count do
    out[i] = list[from + i - 1]
  end
  return out
end
