-- Settle one admitted use: charge what it used, refund the rest of its reservation, free its concurrency slot.
-- KEYS: 1 log, 2 tok, 3 act (see reserve.lua). ARGV: 1 member, 2 used_tokens, 3 now_ms.
-- Returns 1 when settled; 0 when there was nothing to settle (settled already, or its lease expired, in which
-- case the full reservation stays charged). So settling twice is harmless.
local tok, act = KEYS[2], KEYS[3]
local member = ARGV[1]
local deadline = redis.call('ZSCORE', act, member)
if not deadline then
  return 0
end
redis.call('ZREM', act, member)
if tonumber(deadline) <= tonumber(ARGV[3]) then
  return 0
end
local charged = redis.call('HGET', tok, member)
if charged then
  local used = tonumber(ARGV[2])
  redis.call('HSET', tok, member, used)
  redis.call('HINCRBY', tok, '#', used - tonumber(charged))
end
return 1
