-- settle: the holder submitted its job (or left the slot): count the lease until a snapshot
-- reflects it; gone at once if the latest snapshot already lists its job. A lease the fleet
-- reclaimed from a paused holder settles the same way: its job may be real, so it counts
-- from now until a snapshot lists it or a later one misses it.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {lease, account, job (job id or ''), waiter, owner, ttl, strategy, pref, grace,
--            idle}
-- returns  - '{}'
local epoch = ensure_epoch()
reclaim()
local rec = lease_get(A.lease)
local changed = false
if not rec then
  -- gone: lost with Redis's data, or reclaimed and released by a snapshot since; the
  -- holder may have created its job all the same: count it again until a snapshot after now
  rec = {a = A.account, w = A.waiter, o = A.owner}
  pend_add(A.account, 1)
end
if not rec.s or rec.r then
  rec.s = tick()
  rec.t = NOW
  rec.r = nil
  if A.job ~= '' then rec.j = A.job end
  redis.call('ZREM', P .. 'lexp', A.lease)
  clear_grant(rec, A.lease)
  if rec.j and redis.call('SISMEMBER', P .. 'jobs', rec.j) == 1 then
    drop_lease(A.lease, rec)
    changed = true
  else
    lease_put(A.lease, rec)
  end
end
if changed then dispatch(epoch) end
finish()
return '{}'
