-- restore: put a quarantined account back into rotation now.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {account, owner, ttl, strategy, pref, grace, idle}
-- returns  - '{}'
local epoch = ensure_epoch()
if redis.call('HDEL', P .. 'quar', A.account) == 1 then
  PUB_ALL = true
  dispatch(epoch)
end
finish()
return '{}'
