-- quarantine: take an account out of rotation for a while.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {account, seconds, reason, grace, idle}
-- returns  - '{}'
ensure_epoch()
redis.call('HSET', P .. 'quar', A.account, cjson.encode({u = NOW + A.seconds, r = A.reason}))
PUB_ALL = true
finish()
return '{}'
