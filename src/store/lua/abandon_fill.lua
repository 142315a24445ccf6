-- Hands a fill lease back so that a waiter takes it over at once.
-- KEYS[1]: entry key, KEYS[2]: its lease key. ARGV: fill channel, lease token.
-- Returns: 1 when the lease was current and is released, else 0.
on_this_node(KEYS[1])
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
void_lease(KEYS[1], ARGV[1])
return 1
