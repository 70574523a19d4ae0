-- close: a gate closed: its waiters leave at once, grants not picked up go back.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {waiters: [waiter ids], owner, ttl, strategy, pref, grace, idle}
-- returns  - '{}'
local epoch = ensure_epoch()
local changed = false
for _, wid in ipairs(A.waiters) do
  remove_waiter(wid)
  redis.call('ZADD', P .. 'gone', NOW, wid)
  local g = redis.call('HGET', P .. 'granted', wid)
  if g then
    local gid = cjson.decode(g)[1]
    local rec = lease_get(gid)
    if rec and not rec.s then drop_lease(gid, rec); changed = true end
    redis.call('HDEL', P .. 'granted', wid)
  end
end
if changed then dispatch(epoch) end
finish()
return '{}'
