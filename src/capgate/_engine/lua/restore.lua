-- restore: put a quarantined account back into rotation now, for every model too.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {account, owner, ttl, strategy, pref, grace, idle}
-- returns  - '{}'
local epoch = ensure_epoch()
local back = redis.call('HDEL', P .. 'quar', A.account) == 1
-- and for every model it was out for
local flat = redis.call('HKEYS', P .. 'mquar')
for _, field in ipairs(flat) do
  if cjson.decode(field)[1] == A.account then
    redis.call('HDEL', P .. 'mquar', field)
    back = true
  end
end
if back then
  PUB_ALL = true
  dispatch(epoch)
end
finish()
return '{}'
