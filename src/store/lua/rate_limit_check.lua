-- Decides a check against all of its limits and, when every enforced limit
-- allows it, consumes each limit's cost from every limit that allows it and
-- is not peeked: all-or-nothing.
--
-- A Redis Function library (Redis 7), not a script: `store/function.rs`
-- names it and loads it. A script's body runs whole on every EVALSHA, making
-- its local functions afresh each time; a library's top level runs once, at
-- load, and only `check` runs per call (9.35 -> 8.41 us of Redis per
-- one-bucket check: BENCHMARKS.md). The standard libraries are out of reach
-- while a library loads (Redis 7.0), so `check` takes its aliases of them
-- at each call.
--
-- keys: one state key per limit, in request order (P:rl:f:K, P:rl:s:K or
--       P:rl:t:K by algorithm; src/keys.rs).
-- args: six per limit: algorithm ('f' fixed window, 's' sliding window,
--       't' token bucket), limit, period ms, burst (bucket; else 0), cost,
--       flags: '' or any of 'p' (peek: decide, never write) and 'a'
--       (advisory: a denial is reported but does not deny the request, as
--       Envoy's shadow_mode; it is not consumed either).
-- Returns: five integers per limit, in request order: allowed (1/0),
--       remaining, reset_after ms, retry_after ms, and the window the limit
--       counted in (its index; 0 for a bucket), which a refund
--       (rate_limit_refund.lua) needs. Packed into one string as
--       little-endian 64-bit integers: one reply item instead of five per
--       limit costs Redis less to write (7.18 -> 6.85 us per one-bucket
--       check) and the service's RESP parser far less to read.
--
-- Lua in Redis, not MULTI: each decision reads stored state and the clock,
-- and whether anything is written depends on every decision, so reading,
-- deciding and writing must be one atomic step. Two passes: first decide
-- every limit from the current state (reads only), then, only if every
-- enforced limit allows, write the new state of each limit that allows and
-- is not peeked. RateLimitService.Check sends one cost for all and flags
-- '' (or 'p' for a peek), so for it this is plain all-or-nothing. A lone
-- limit (the common Check) is decided and written in one pass.
--
-- Written for Redis's CPU, as this runs once per Check: the deciders return
-- plain values rather than tables, and nothing builds a closure or a table
-- per limit (a general script with tables took 7.6 us of Redis per
-- one-bucket check, this one as a script 6.9 us, a one-bucket-only script
-- 5.3 us). Numbers go to redis.call as numbers: Redis writes them with 17
-- significant digits, exact for these integers, without a string.format of
-- ours.
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

-- Set at the start of each call (Redis runs one at a time).
local now, floor, max, find

-- floor(a / b) for integers a >= 0, b > 0, corrected where the float
-- division rounded up to the next integer.
local function idiv(a, b)
  local q = floor(a / b)
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

-- Each decider returns: ok, retry ms, remaining (as is, after taking cost),
-- reset ms (as is, after taking cost), the key's TTL ms once written, the
-- window counted in, then the hash fields to write as name, value pairs.

local function fixed(key, limit, period, _, cost)
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
  return ok, retry, max(0, limit - n), max(0, limit - n - cost), reset_now, left, left, w,
    'w', w, 'n', n + cost
end

-- The sliding window's remaining count and reset time with `c` counted in
-- window w (weighted: what window w - 1 still counts, times period).
local function sliding_remaining(cap, weighted, c, period)
  return idiv(max(0, cap - weighted - c * period), period)
end

local function sliding_reset(c, prev, period, e)
  if c > 0 then
    return 2 * period - e
  elseif prev > 0 then
    return period - e
  end
  return 0
end

local function sliding(key, limit, period, _, cost)
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
      at = max(e, period - idiv((x - curr) * period, prev))
    end
    if at < period then
      retry = at - e
    else
      -- In the next window this window's count becomes the previous one.
      local e2 = 0
      if curr > 0 then
        e2 = max(0, period - idiv(x * period, curr))
      end
      retry = period - e + e2
    end
  end
  return ok, retry, sliding_remaining(cap, weighted, curr, period),
    sliding_remaining(cap, weighted, curr + cost, period), sliding_reset(curr, prev, period, e),
    sliding_reset(curr + cost, prev, period, e), 2 * period - e, w,
    'w', w, 'c', curr + cost, 'p', prev
end

local function bucket(key, limit, period, burst, cost)
  local s = redis.call('HMGET', key, 't', 'd')
  local t0, d0 = tonumber(s[1]), tonumber(s[2])
  local debt = 0
  if t0 and d0 then
    -- A clock that stepped back drains nothing.
    debt = max(0, d0 - max(0, now - t0) * limit)
  end
  local cap = burst * period
  local take = cost * period
  local ok = debt + take <= cap
  local retry = 0
  if not ok then
    retry = cdiv(debt + take - cap, limit)
  end
  local full_in = cdiv(debt + take, limit)
  return ok, retry, idiv(max(0, cap - debt), period), idiv(max(0, cap - debt - take), period),
    cdiv(debt, limit), full_in, full_in, 0,
    't', now, 'd', debt + take
end

-- Writes a decision's state when `consume` and it allows; returns its five
-- reply values.
local function settle(key, consume, ok, retry, r0, r1, s0, s1, ttl, w, f1, v1, f2, v2, f3, v3)
  if not ok then
    return 0, r0, s0, retry, w
  elseif not consume then
    return 1, r0, s0, retry, w
  end
  if f3 then
    redis.call('HSET', key, f1, v1, f2, v2, f3, v3)
  else
    redis.call('HSET', key, f1, v1, f2, v2)
  end
  redis.call('PEXPIRE', key, ttl)
  return 1, r1, s1, retry, w
end

local function decide(keys, args, i)
  local base = (i - 1) * 6
  local algorithm, key = args[base + 1], keys[i]
  local limit, period, burst, cost = tonumber(args[base + 2]), tonumber(args[base + 3]), tonumber(args[base + 4]),
    tonumber(args[base + 5])
  if algorithm == 't' then
    return bucket(key, limit, period, burst, cost)
  elseif algorithm == 's' then
    return sliding(key, limit, period, burst, cost)
  elseif algorithm == 'f' then
    return fixed(key, limit, period, burst, cost)
  end
  error('unknown algorithm ' .. tostring(algorithm))
end

local function has(flags, flag)
  return flags ~= '' and find(flags, flag, 1, true) ~= nil
end

local function check(keys, args)
  floor, max, find = math.floor, math.max, string.find
  -- Clock: Redis TIME, read once per call, in whole milliseconds.
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + floor(tonumber(time[2]) / 1000)

  -- One limit: its own decision is the whole check.
  if #keys == 1 then
    return struct.pack('<i8i8i8i8i8', settle(keys[1], not has(args[6], 'p'), decide(keys, args, 1)))
  end

  -- Pass 1: decide every limit; read only. A decision is the decider's values.
  local decisions = {}
  local all = true
  for i = 1, #keys do
    local d = {decide(keys, args, i)}
    decisions[i] = d
    all = all and (d[1] or has(args[i * 6], 'a'))
  end

  -- Pass 2: consume from every limit that allows and is not peeked, or from none.
  local out = {}
  for i, key in ipairs(keys) do
    out[i] = struct.pack('<i8i8i8i8i8', settle(key, all and not has(args[i * 6], 'p'), unpack(decisions[i], 1, 14)))
  end
  return table.concat(out)
end

-- FUNCTION_NAME is set by store/function.rs, which names the library after
-- its code.
redis.register_function(FUNCTION_NAME, check)
