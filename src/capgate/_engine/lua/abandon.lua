-- abandon: a waiter left (timeout, cancel, error): out of the queue for good, and a grant
-- made to it meanwhile goes back.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {waiter, owner, ttl, strategy, pref, grace, idle}
-- returns  - '{}'
local epoch = ensure_epoch()
reclaim()
remove_waiter(A.waiter)
redis.call('ZADD', P .. 'gone', NOW, A.waiter)
local changed = false
local g = redis.call('HGET', P .. 'granted', A.waiter)
if g then
  local gid = cjson.decode(g)[1]
  local rec = lease_get(gid)
  if rec and not rec.s then drop_lease(gid, rec); changed = true end
  redis.call('HDEL', P .. 'granted', A.waiter)
end
if changed then dispatch(epoch) end
finish()
return '{}'
