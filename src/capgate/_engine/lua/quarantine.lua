-- quarantine: take an account out of rotation for a while (for one model only, if given).
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {account, seconds, reason, model (or absent), grace, idle}
-- returns  - '{}'
ensure_epoch()
local entry = cjson.encode({u = NOW + A.seconds, r = A.reason})
if A.model then
  redis.call('HSET', P .. 'mquar', cjson.encode({A.account, A.model}), entry)
else
  redis.call('HSET', P .. 'quar', A.account, entry)
end
PUB_ALL = true
finish()
return '{}'
