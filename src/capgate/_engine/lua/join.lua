-- join: a gate joins its fleet; the first member's configuration becomes the fleet's.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {config (canonical JSON of max_jobs, accounts and strategy), grace, idle}
-- returns  - JSON {config: the fleet's configuration (canonical JSON), epoch}
local epoch = ensure_epoch()
local c = redis.call('HGET', M, 'config')
if not c then
  redis.call('HSET', M, 'config', A.config)
  c = A.config
end
finish()
return cjson.encode({config = c, epoch = epoch})
