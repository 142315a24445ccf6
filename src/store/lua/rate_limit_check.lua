-- Decides a Check against all of its limits and, when every limit allows it
-- and it is not a peek, consumes `cost` from each: all-or-nothing.
-- KEYS: one state key per limit, in request order (P:rl:f:K, P:rl:s:K or
--       P:rl:t:K by algorithm; src/keys.rs).
-- ARGV[1]: cost; ARGV[2]: '1' to peek (decide, write nothing), else '0';
--       then four per limit: algorithm ('f' fixed window, 's' sliding
--       window, 't' token bucket), limit, period ms, burst (bucket; else 0).
-- Returns: five integers per limit, in request order: allowed (1/0),
--       remaining, reset_after ms, retry_after ms, and the window the limit
--       counted in (its index; 0 for a bucket), which a refund
--       (rate_limit_refund.lua) needs.
--
-- A script, not MULTI: each decision reads stored state and the clock, and
-- whether anything is written depends on every decision, so reading,
-- deciding and writing must be one atomic step. Two passes: first decide
-- every limit from the current state (reads only), then, only if all allow
-- and this is no peek, write every limit's new state.
--
-- Clock: Redis TIME, read once, in whole milliseconds; never the caller's.
-- Arithmetic: integers only (ms, units); Lua's doubles hold them exactly
-- while limit x period (and burst x period) stays below 2^53.
--
-- State, one hash per caller key and algorithm, expiring by itself:
--   fixed    w = window index (floor(now / period)), n = units counted in it.
--            Expires when the window ends.
--   sliding  w = window index, c = units in window w, p = units in window
--            w - 1. Expires when window w + 1 ends (w's count stops counting).
--   bucket   GCRA. d = debt in unit-ms (units taken and not yet refilled,
--            times period), measured at time t (ms); it drains at `limit`
--            per ms, so the theoretical arrival time is t + d / limit.
--            Expires when the debt reaches zero: a missing bucket is full.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local cost = tonumber(ARGV[1])
local peek = ARGV[2] == '1'

-- floor(a / b) for integers a >= 0, b > 0, corrected where the float
-- division rounded up to the next integer.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- ceil(a / b), same domain.
local function cdiv(a, b)
  local q = idiv(a, b)
  if q * b < a then
    q = q + 1
  end
  return q
end

-- An integer as a string, all digits (tostring would round to 14).
local function int(x)
  return string.format('%.0f', x)
end

-- Each decider returns: ok, retry ms, remaining {as is, after taking cost},
-- reset ms {as is, after taking cost}, the fields to write, the key's TTL ms.

local function fixed(key, limit, period)
  local w = idiv(now, period)
  local s = redis.call('HMGET', key, 'w', 'n')
  local n = 0
  if tonumber(s[1]) == w then
    n = tonumber(s[2]) or 0
  end
  local left = (w + 1) * period - now
  local ok = n + cost <= limit
  local retry = 0
  if not ok then
    -- The next window starts from zero, and cost <= limit (validated).
    retry = left
  end
  local reset_now = 0
  if n > 0 then
    reset_now = left
  end
  return ok, retry, {math.max(0, limit - n), math.max(0, limit - n - cost)}, {reset_now, left},
    {'w', int(w), 'n', int(n + cost)}, left, w
end

local function sliding(key, limit, period)
  local w = idiv(now, period)
  local e = now - w * period
  local s = redis.call('HMGET', key, 'w', 'c', 'p')
  local w0, c0, p0 = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
  local curr, prev = 0, 0
  if w0 == w then
    curr, prev = c0, p0
  elseif w0 == w - 1 then
    prev = c0
  end
  -- Everything times period, to stay in integers: the estimate is
  -- (prev x (period - e) + curr x period) / period.
  local weighted = prev * (period - e)
  local cap = limit * period
  local ok = weighted + (curr + cost) * period <= cap
  local retry = 0
  if not ok then
    local x = limit - cost -- what may be counted before this request
    -- Within this window, the previous window's weight falls as e grows:
    -- passes from the first e' with prev x (period - e') <= (x - curr) x period.
    local at = period
    if curr <= x and prev > 0 then
      at = math.max(e, period - idiv((x - curr) * period, prev))
    end
    if at < period then
      retry = at - e
    else
      -- In the next window this window's count becomes the previous one.
      local e2 = 0
      if curr > 0 then
        e2 = math.max(0, period - idiv(x * period, curr))
      end
      retry = period - e + e2
    end
  end
  local function remaining(c)
    return idiv(math.max(0, cap - weighted - c * period), period)
  end
  local function reset(c)
    if c > 0 then
      return 2 * period - e
    elseif prev > 0 then
      return period - e
    end
    return 0
  end
  return ok, retry, {remaining(curr), remaining(curr + cost)}, {reset(curr), reset(curr + cost)},
    {'w', int(w), 'c', int(curr + cost), 'p', int(prev)}, 2 * period - e, w
end

local function bucket(key, limit, period, burst)
  local s = redis.call('HMGET', key, 't', 'd')
  local t0, d0 = tonumber(s[1]), tonumber(s[2])
  local debt = 0
  if t0 and d0 then
    -- A clock that stepped back drains nothing.
    debt = math.max(0, d0 - math.max(0, now - t0) * limit)
  end
  local cap = burst * period
  local take = cost * period
  local ok = debt + take <= cap
  local retry = 0
  if not ok then
    retry = cdiv(debt + take - cap, limit)
  end
  local function remaining(d)
    return idiv(math.max(0, cap - d), period)
  end
  local full_in = cdiv(debt + take, limit)
  return ok, retry, {remaining(debt), remaining(debt + take)}, {cdiv(debt, limit), full_in},
    {'t', int(now), 'd', int(debt + take)}, full_in, 0
end

local deciders = {f = fixed, s = sliding, t = bucket}

-- Pass 1: decide every limit; read only.
local decisions = {}
local all = true
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 4
  local decide = deciders[ARGV[base + 1]]
  if not decide then
    return redis.error_reply('unknown algorithm ' .. tostring(ARGV[base + 1]))
  end
  local ok, retry, remaining, reset, fields, ttl, window =
    decide(key, tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]))
  decisions[i] = {ok, retry, remaining, reset, fields, ttl, window}
  all = all and ok
end

-- Pass 2: consume from every limit, or from none.
local consume = all and not peek
local out = {}
for i, key in ipairs(KEYS) do
  local d = decisions[i]
  local which = 1
  if consume then
    which = 2
    redis.call('HSET', key, unpack(d[5]))
    redis.call('PEXPIRE', key, int(d[6]))
  end
  local allowed = 0
  if d[1] then
    allowed = 1
  end
  out[#out + 1] = allowed
  out[#out + 1] = d[3][which]
  out[#out + 1] = d[4][which]
  out[#out + 1] = d[2]
  out[#out + 1] = d[7]
end
return out
