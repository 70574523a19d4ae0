-- begin_poll: take the fleet's poll lock if a poll is due (or forced).
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {token (the lock's value), lock_ms, force, grace, idle}
-- returns  - JSON {ok: true, tick, sent (server seconds as text), failures, gen (the
--            generation the tick counts in)} when the lock is ours, else {ok: false, wait:
--            seconds until asking again makes sense}
local _, gen = ensure_epoch()
if not A.force and NOW < mget('next_poll_at', 0) then
  finish()
  return cjson.encode({ok = false, wait = mget('next_poll_at', 0) - NOW})
end
if not redis.call('SET', P .. 'lock', A.token, 'NX', 'PX', A.lock_ms) then
  finish()
  return cjson.encode({ok = false, wait = redis.call('PTTL', P .. 'lock') / 1000})
end
local st = tick()
redis.call('HSET', M, 'last_sent', NOW)
redis.call('HDEL', M, 'inval')
finish()
return cjson.encode({ok = true, tick = st, sent = tostring(NOW), failures = mget('failures', 0),
  gen = gen})
