-- unlock: release the poll lock if it is still ours (a poll aborted mid-request).
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {token, grace, idle}
-- returns  - '{}'
if redis.call('GET', P .. 'lock') == A.token then redis.call('DEL', P .. 'lock') end
PUB_ALL = true
finish()
return '{}'
