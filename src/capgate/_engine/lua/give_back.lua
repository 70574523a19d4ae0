-- give_back: the holder never used its slot (or met a 429: busy): it stops counting now.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {lease, account, busy (mark the account busy: see apply.lua), owner, ttl,
--            strategy, pref, grace, idle}
-- returns  - '{}'
local epoch = ensure_epoch()
reclaim()
local rec = lease_get(A.lease)
local changed = false
if rec then drop_lease(A.lease, rec); changed = true end
if A.busy then
  redis.call('HSET', P .. 'busy', A.account, tick())
  -- the room the snapshot showed, which the 429 contradicts ('' if it left the account out)
  redis.call('HSET', P .. 'busyroom', A.account, redis.call('HGET', P .. 'limit', A.account) or '')
end
if changed then dispatch(epoch) end
finish()
return '{}'
