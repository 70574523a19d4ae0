-- sync: enqueue this process's new waiters, heartbeat the others, run a dispatch pass, and
-- return the grants made to them with the fleet's state.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {owner, ttl (waiter heartbeat), strategy, pref, known_tick, grace, idle,
--            waiters: [[waiter id, priority, allowed accounts or false, model or false], ...]}
-- returns  - JSON: the state (see common.lua's state()) plus granted: {waiter id: [lease id,
--            account]} for the waiters given
local epoch = ensure_epoch()
reclaim()
for _, w in ipairs(A.waiters) do
  local wid = w[1]
  if redis.call('HEXISTS', P .. 'granted', wid) == 1 then
    -- granted: nothing to do until the owner claims it
  elseif redis.call('HEXISTS', P .. 'wait', wid) == 1 then
    redis.call('ZADD', P .. 'whb', NOW + A.ttl, wid)
  elseif not redis.call('ZSCORE', P .. 'gone', wid) then
    local n = redis.call('HINCRBY', M, 'arrivals', 1)
    local m = string.format('%016d', n) .. ':' .. wid
    redis.call('ZADD', P .. 'queue', -tonumber(w[2]), m)
    local rec = {m = m, o = A.owner}
    if type(w[3]) == 'table' then rec.al = w[3] end
    if w[4] then rec.md = w[4] end
    redis.call('HSET', P .. 'wait', wid, cjson.encode(rec))
    redis.call('ZADD', P .. 'whb', NOW + A.ttl, wid)
  end
end
dispatch(epoch)
local out = {}
for _, w in ipairs(A.waiters) do
  local g = redis.call('HGET', P .. 'granted', w[1])
  if g then out[w[1]] = cjson.decode(g) end
end
finish()
local s = state(A.known_tick)
s.granted = out
return cjson.encode(s)
