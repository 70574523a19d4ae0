-- close: a gate closed: its waiters leave the queue at once, and grants made to it that no
-- slot picked up go back. Leases of slots still inside their blocks stay (they are in use,
-- and their holders settle them); settled leases keep counting until a snapshot reflects them.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {owner, held: [lease ids of slots still held], known_tick, ttl, strategy, pref,
--            grace, idle}
-- returns  - JSON: the state (see common.lua's state()), so statistics() after close is true
local epoch = ensure_epoch()
reclaim()
local keep = {}
for _, id in ipairs(A.held) do keep[id] = true end
local flat = redis.call('HGETALL', P .. 'wait')
for i = 1, #flat, 2 do
  if cjson.decode(flat[i + 1]).o == A.owner then
    remove_waiter(flat[i])
    redis.call('ZADD', P .. 'gone', NOW, flat[i])
  end
end
local changed = false
local grants = redis.call('HGETALL', P .. 'granted')
for i = 1, #grants, 2 do
  local gid = cjson.decode(grants[i + 1])[1]
  local rec = lease_get(gid)
  if rec and rec.o == A.owner and not rec.s and not keep[gid] then
    drop_lease(gid, rec)
    changed = true
  end
end
if changed then dispatch(epoch) end
finish()
return cjson.encode(state(A.known_tick))
