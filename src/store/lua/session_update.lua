-- Replaces a session's data or merges top-level fields into it, without
-- sliding its idle timeout.
-- KEYS[1]: session key.
-- ARGV: 'replace' or 'merge', the data size limit in bytes, then for replace
-- the new data (JSON object); for merge, pairs of (field name, member text
-- `"name":value` as JSON).
-- Returns: {1, {id, user, data, created ms, expires ms}}; {0} when not found;
-- {2, size} when the result would exceed the limit (nothing written);
-- {3} when the stored data is not a JSON object (nothing written).
--
-- The merge splices member texts instead of decoding and re-encoding the
-- data with cjson, which would turn [] into {}, round numbers to 14 digits
-- and reorder fields: values are kept byte for byte.

-- Splits the text of a JSON object into its top-level members. Returns a list
-- of {decoded name, member text}, or nil when `json` is not an object.
-- Compares bytes (string.byte), not one-character strings, to stay fast on
-- large data.
local function json_members(json)
  local find, byte, sub = string.find, string.byte, string.sub
  local QUOTE, COMMA, OPEN_ARRAY, CLOSE_ARRAY, OPEN_OBJECT, CLOSE_OBJECT = 34, 44, 91, 93, 123, 125

  -- The position of the closing quote of the string that opens at `at`.
  local function string_end(at)
    local p = at + 1
    while true do
      local q = find(json, '["\\]', p)
      if not q or byte(json, q) == QUOTE then
        return q
      end
      p = q + 2
    end
  end

  local out = {}
  local pos = find(json, '%S')
  if not pos or byte(json, pos) ~= OPEN_OBJECT then
    return nil
  end
  pos = pos + 1
  while true do
    pos = find(json, '%S', pos)
    if not pos then
      return nil
    end
    local c = byte(json, pos)
    if c == CLOSE_OBJECT then
      return out
    end
    if c == COMMA and #out > 0 then
      pos = find(json, '%S', pos + 1)
      if not pos then
        return nil
      end
    end
    if byte(json, pos) ~= QUOTE then
      return nil
    end
    local name_end = string_end(pos)
    if not name_end then
      return nil
    end
    local raw_name = sub(json, pos, name_end)
    local name = sub(raw_name, 2, -2)
    if find(raw_name, '\\', 1, true) then
      local ok, decoded = pcall(cjson.decode, raw_name)
      if not ok then
        return nil
      end
      name = decoded
    end
    -- The value runs to the first ',' or '}' at depth 0, outside strings.
    local depth, p, value_end = 0, name_end + 1, nil
    while not value_end do
      local q = find(json, '[%[%]{}",]', p)
      if not q then
        return nil
      end
      local d = byte(json, q)
      if d == QUOTE then
        q = string_end(q)
        if not q then
          return nil
        end
      elseif d == OPEN_ARRAY or d == OPEN_OBJECT then
        depth = depth + 1
      elseif depth > 0 and (d == CLOSE_ARRAY or d == CLOSE_OBJECT) then
        depth = depth - 1
      elseif depth == 0 then
        value_end = q - 1
      end
      p = q + 1
    end
    -- Drop whitespace before the ',' or '}'.
    local last = value_end
    while find(json, '^%s', last) do
      last = last - 1
    end
    out[#out + 1] = {name, sub(json, pos, last)}
    pos = value_end + 1
  end
end

local s = KEYS[1]
local fields = read_session(s)
if not fields then
  return {0}
end
local data = ARGV[3]
if ARGV[1] == 'merge' then
  local members = json_members(fields[3])
  if not members then
    return {3}
  end
  local at = {}
  for i, member in ipairs(members) do
    at[member[1]] = i
  end
  for i = 3, #ARGV, 2 do
    local name, text = ARGV[i], ARGV[i + 1]
    if at[name] then
      members[at[name]][2] = text
    else
      members[#members + 1] = {name, text}
      at[name] = #members
    end
  end
  local texts = {}
  for i, member in ipairs(members) do
    texts[i] = member[2]
  end
  data = '{' .. table.concat(texts, ',') .. '}'
end
if #data > tonumber(ARGV[2]) then
  return {2, #data}
end
redis.call('HSET', s, 'data', data)
fields[3] = data
return {1, session_row(s, fields)}
