-- renew: a live process extends its leases and its waiters' heartbeats.
-- A lease the fleet reclaimed (its holder stopped renewing longer than the lease) is never
-- re-created here: its holder is told it is lost. Only a lease Redis lost is re-asserted (one
-- of an older epoch: the data is gone; or a failover to a replica that had not received it
-- yet), unless the fleet remembers reclaiming it, and only during the recovery grace: after
-- it the fleet grants again, and a holder that comes back later (paused past the grace) may
-- find its slot granted to another; it is told its lease is lost.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {owner, lease_ttl, ttl (waiter heartbeat), held: [[lease id, account, waiter
--            id], ...], waiters: [waiter ids], grace, idle}
-- returns  - JSON {reasserted: n, lost: [lease ids], epoch}
local epoch = ensure_epoch()
local reasserted, lost, mine = 0, {}, {}
for _, l in ipairs(A.held) do mine[l[1]] = true end
for _, l in ipairs(A.held) do
  local id = l[1]
  local rec = lease_get(id)
  if not rec and not redis.call('ZSCORE', P .. 'lost', id)
      and NOW < mget('grace_until', 0) then
    rec = {a = l[2], w = l[3], o = A.owner}
    pend_add(l[2], 1)
    lease_put(id, rec)
    reasserted = reasserted + 1
  end
  if not rec or rec.r then
    lost[#lost + 1] = id
  elseif not rec.s then
    redis.call('ZADD', P .. 'lexp', NOW + A.lease_ttl, id)
  end
end
for _, wid in ipairs(A.waiters) do
  if redis.call('HEXISTS', P .. 'wait', wid) == 1 then
    redis.call('ZADD', P .. 'whb', NOW + A.ttl, wid)
  end
  local g = redis.call('HGET', P .. 'granted', wid)
  if g then
    -- granted but not picked up yet: it lives as long as its waiter's heartbeat
    local gid = cjson.decode(g)[1]
    if not mine[gid] and redis.call('ZSCORE', P .. 'lexp', gid) then
      redis.call('ZADD', P .. 'lexp', NOW + A.ttl, gid)
    end
  end
end
finish()
return cjson.encode({reasserted = reasserted, lost = lost, epoch = epoch})
