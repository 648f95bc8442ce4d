-- Give back a use whose caller never got (or gave up waiting for) the answer of its reserve: the reserve timed
-- out, was cancelled, or its caller shut down. Whatever that reserve did or will do is undone:
--   * admitted already: forgotten entirely: its request no longer counts, its tokens are refunded, its slot frees;
--   * not arrived yet (queued behind a pause or a stopped server): a tombstone in `rel` makes reserve.lua refuse
--     it when it arrives, for `keep_ms` (the lease: a reserve arriving later than that is refused as stale there).
-- KEYS: 1 log, 2 tok, 3 act (see reserve.lua), 4 rel. ARGV: 1 member, 2 now_ms, 3 keep_ms.
-- Returns 1 when an admitted use was given back, 0 when there was none. Idempotent.
local log, tok, act, rel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member = ARGV[1]
local now, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', rel, '-inf', string.format('%d', now))
redis.call('ZADD', rel, now + keep, member)
redis.call('PEXPIRE', rel, keep)
local released = redis.call('ZREM', act, member)
if redis.call('ZREM', log, member) == 1 then
  released = 1
  local charged = redis.call('HGET', tok, member)
  if charged then
    redis.call('HDEL', tok, member)
    redis.call('HINCRBY', tok, '#', -tonumber(charged))
  end
end
return released
