-- Admit one use of a quota subject, or say which limit refuses it and when to retry. One atomic round trip.
--
-- KEYS (one hash tag, so one Redis Cluster slot):
--   1 log: zset, member -> admission time (ms). Every admitted use inside the long window.
--   2 tok: hash, member -> tokens charged for that use; field '#' -> sum over the window; field 'e' -> when
--          the three keys expire (ms).
--   3 act: zset, member -> lease deadline (ms). Admitted and not settled yet.
--   4 rel: zset, member -> until (ms). Uses released before (or without) an answer (release.lua): a reserve of
--          such a member that reaches Redis late (it was queued behind a pause or a stalled server) is refused.
-- ARGV: 1 member, 2 the check as 11 little-endian doubles (exact for integers below 2^53): now_ms, window_ms,
--       request_limit, token_limit, short_window_ms, burst_limit, concurrency_limit, hits, tokens, lease_ms,
--       dry_run (1: report, change nothing) -- `Check` in store.py, in its field order. One packed argument in, one packed string out: with a pure-Python
--       client, encoding and parsing each element costs more than the script itself.
-- Limits below 0 are unlimited. Windows slide: a use at time t counts while now < t + window.
-- Returns 9 packed doubles: admitted, refused, retry_ms, requests, burst, tokens, active, oldest_ms, oldest_burst_ms.
-- refused: 0 none, 1 requests, 2 burst, 3 tokens, 4 concurrency, 5 released (the caller gave this use up before
-- it got an answer, or the call arrived after its own lease would have ended: stale); retry_ms -1 = can never fit.
-- Keep in step with MemoryQuotaStore (limiter_service/store.py); the same tests run against both.
local log, tok, act, rel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member = ARGV[1]
local now, window, req_limit, tok_limit, short, burst_limit, conc_limit, hits, need, lease, dry_flag =
  struct.unpack('<ddddddddddd', ARGV[2])
local dry = dry_flag == 1
local short_from = '(' .. string.format('%d', now - short)
local cut = now - window

-- Uses that left the window stop counting, and so do their tokens. (Only scanned when the oldest has left.)
local first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
if #first == 2 and tonumber(first[2]) <= cut then
  local expired = redis.call('ZRANGEBYSCORE', log, '-inf', string.format('%d', cut))
  local freed = 0
  for i = 1, #expired, 1000 do
    local chunk = {unpack(expired, i, math.min(i + 999, #expired))}
    for _, t in ipairs(redis.call('HMGET', tok, unpack(chunk))) do
      if t then freed = freed + tonumber(t) end
    end
    redis.call('HDEL', tok, unpack(chunk))
  end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', string.format('%d', cut))
  if freed ~= 0 then
    redis.call('HINCRBY', tok, '#', -freed)
  end
  first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
end
local oldest = -1
if #first == 2 then oldest = tonumber(first[2]) end
-- A lease past its deadline belongs to a caller that never settled (it died): the slot frees, the tokens stay
-- charged in full.
local active = 0
if lease > 0 or conc_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', act, '-inf', string.format('%d', now))
  active = redis.call('ZCARD', act)
end
local requests = redis.call('ZCARD', log)
local totals = redis.call('HMGET', tok, '#', 'e')
local spent = tonumber(totals[1] or '0')
local expires = tonumber(totals[2] or '0')
-- The short window's count and oldest use; when the oldest use of all is inside it, that is everything.
local burst, oldest_burst = requests, oldest
if oldest >= 0 and oldest <= now - short then
  burst = redis.call('ZCOUNT', log, short_from, '+inf')
  local fb = redis.call('ZRANGEBYSCORE', log, short_from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  oldest_burst = -1
  if #fb == 2 then oldest_burst = tonumber(fb[2]) end
end

local function state(admitted, refused, retry)
  return struct.pack('<ddddddddd', admitted, refused, retry, requests, burst, spent, active, oldest, oldest_burst)
end

-- A use its caller released before any answer reached it must not start now (see release.lua).
if not dry then
  local released_until = redis.call('ZSCORE', rel, member)
  if released_until and tonumber(released_until) > now then
    return state(0, 5, -1)
  end
end

-- The same member again is a retry of an admitted use: admit it once, and report the counts as they were just
-- after it (uses are logged in admission order, see below), so a retry shows the remaining quota it was given.
local seen = redis.call('ZSCORE', log, member)
if seen then
  requests = redis.call('ZRANK', log, member) + hits
  burst = redis.call('ZCOUNT', log, short_from, seen)
  return state(1, 0, 0)
end

local refused, retry = 0, 0
-- Callers stamp `now` before their call, so a later script may carry an earlier `now` than uses already logged;
-- waits are capped at the window for that (a few milliseconds at most).
-- Several limits may refuse; report the one that frees last, since retrying earlier would be refused again.
local function refuse(code, ms)
  if retry >= 0 and (refused == 0 or ms < 0 or ms > retry) then
    refused, retry = code, ms
  end
end

if req_limit >= 0 then
  if hits > req_limit then
    refuse(1, -1)
  elseif requests + hits > req_limit then
    -- The (requests + hits - limit)-th oldest use has to leave the window first.
    local at = requests + hits - req_limit - 1
    local e = redis.call('ZRANGE', log, at, at, 'WITHSCORES')
    refuse(1, math.min(window, tonumber(e[2]) + window - now))
  end
end

if burst_limit >= 0 then
  if hits > burst_limit then
    refuse(2, -1)
  elseif burst + hits > burst_limit then
    local at = burst + hits - burst_limit - 1
    local e = redis.call('ZRANGEBYSCORE', log, short_from, '+inf', 'WITHSCORES', 'LIMIT', at, 1)
    refuse(2, math.min(short, tonumber(e[2]) + short - now))
  end
end

if tok_limit >= 0 and need > 0 then
  if need > tok_limit then
    refuse(3, -1)
  elseif spent + need > tok_limit then
    -- Oldest first, until enough tokens have left the window.
    local excess = spent + need - tok_limit
    local freed, at = 0, now
    local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + tonumber(redis.call('HGET', tok, entries[i]) or '0')
      at = tonumber(entries[i + 1])
      if freed >= excess then break end
    end
    refuse(3, math.min(window, at + window - now))
  end
end

if conc_limit >= 0 and lease > 0 then
  if conc_limit == 0 then
    refuse(4, -1)
  elseif active >= conc_limit then
    -- A settle usually frees a slot long before the lease ends; suggest a short wait, at most until the lease.
    local e = redis.call('ZRANGE', act, 0, 0, 'WITHSCORES')
    refuse(4, math.min(1000, tonumber(e[2]) - now))
  end
end

if refused ~= 0 then
  return state(0, refused, retry)
end
if dry then
  return state(1, 0, 0)
end

local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
-- A call stamped so long ago that its lease would already be over (other callers have logged uses since): it
-- waited in a queue (a paused or stopped server) and its caller has long given up. Never admit it.
if lease > 0 and #newest == 2 and now + lease <= tonumber(newest[2]) then
  return state(0, 5, -1)
end
-- Scores only grow, so rank is admission order even when a caller's `now` is behind a logged use (see above):
-- a use stamped at or before the newest one is logged a microsecond after it.
local at = now
if #newest == 2 and tonumber(newest[2]) >= now then
  at = tonumber(newest[2]) + 0.001
end
if hits == 1 then
  redis.call('ZADD', log, at, member)
else
  local args = {at, member}
  for i = 2, hits do
    args[#args + 1] = at
    args[#args + 1] = member .. '#' .. i
  end
  redis.call('ZADD', log, unpack(args))
end
if need > 0 then
  redis.call('HSET', tok, member, need, '#', spent + need)
end
if lease > 0 then
  redis.call('ZADD', act, now + lease, member)
end
-- Idle subjects vanish by themselves: the keys must outlive this use by `life`. Subjects with a token hash keep
-- the expiry there and push it out (to twice `life`) only when less than `life` is left, which saves three
-- PEXPIREs on nearly every call; others (edge checks: one key) set it each time.
local life = math.max(window, short) + lease
if need > 0 then
  if expires - now < life then
    -- Relative: `now` is the caller's clock, which need not be Redis' (only its rate must match).
    redis.call('HSET', tok, 'e', string.format('%d', now + 2 * life))
    redis.call('PEXPIRE', tok, 2 * life)
    redis.call('PEXPIRE', log, 2 * life)
    if lease > 0 then
      redis.call('PEXPIRE', act, 2 * life)
    end
  end
else
  redis.call('PEXPIRE', log, life)
  if lease > 0 then
    redis.call('PEXPIRE', act, life)
  end
end
requests, burst, spent = requests + hits, burst + hits, spent + need
if lease > 0 then active = active + 1 end
if oldest < 0 or now < oldest then oldest = now end
if oldest_burst < 0 or now < oldest_burst then oldest_burst = now end
return state(1, 0, 0)
