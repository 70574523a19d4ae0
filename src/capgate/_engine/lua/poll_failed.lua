-- poll_failed: record a failed poll and when the next one is due; release the lock.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {token, tick and gen (the poll's, from begin_poll), auth (a refused token), message,
--            status, delay (seconds, computed by capgate._policy.backoff_delay from the
--            failures begin_poll returned), grace, idle}
-- returns  - '{}'
-- A poll begun before the fleet's latest snapshot's (a poller paused past its lock), or in
-- another generation, failed too late to matter: it is counted, and changes neither the
-- backoff nor the next poll.
local _, gen = ensure_epoch()
if A.gen ~= gen or A.tick < mget('sent_tick', 0) then
  redis.call('HINCRBY', M, 'polls_failed', 1)
  redis.call('HINCRBY', M, 'polls_late', 1)
  if redis.call('GET', P .. 'lock') == A.token then redis.call('DEL', P .. 'lock') end
  finish()
  return '{}'
end
redis.call('HINCRBY', M, 'polls_failed', 1)
redis.call('HSET', M, 'last_error', A.message)
if A.auth then
  redis.call('HSET', M, 'auth_at', NOW, 'auth_msg', A.message, 'auth_status', A.status)
else
  redis.call('HINCRBY', M, 'failures', 1)
end
redis.call('HSET', M, 'next_poll_at', NOW + A.delay)
if redis.call('GET', P .. 'lock') == A.token then redis.call('DEL', P .. 'lock') end
PUB_ALL = true
finish()
return '{}'
