-- Counts the members of an activity group seen within a window before now.
-- KEYS[1]: the activity group; ARGV[1]: the window, ms.
-- Returns: the count.
-- A script so that "now" is Redis TIME, the clock MarkActive scores with.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], string.format('%.0f', now - tonumber(ARGV[1])), '+inf')
