-- Shared by every fleet script (prepended to each one).
--
-- KEYS[1] - the fleet's key prefix P; it carries a {hash} tag, so every key of a fleet lives
--           in one Redis Cluster slot. No script touches a key outside it.
-- ARGV[1] - a JSON object of named arguments. Every script reads:
--             grace  seconds nothing is granted after Redis lost its data
--             idle   seconds an idle fleet's keys live (each script refreshes them)
--             now    (tests only) the time to use instead of the server's TIME
--           and the names listed in its own contract.
--
-- Keys under P (each refreshed to live `idle` seconds by every script):
--   meta     hash    epoch, run_id, grace_until, tick, lid, arrivals, sent_tick, sent_at,
--                    fresh_until, next_poll_at, last_sent, failures, polls, polls_failed,
--                    last_error, auth_at/auth_msg/auth_status, rr_last, lag, snap, config,
--                    polls_late (answers that came after a newer one and were dropped)
--   limit    hash    account -> slots the latest snapshot allows (cap applied)
--   order    list    accounts in the snapshot's order
--   jobs     set     job ids the latest snapshot lists as executing
--   watch    hash    job id dropped by the tick rule -> settle time (lag evidence)
--   lags     list    the latest lag samples (meta.lag is their maximum)
--   lease    hash    lease id -> {a: account, w: waiter id, o: owner, s: settle tick,
--                    t: settle time, j: job id, m: missed by a lagging snapshot, r: reclaimed}
--   lexp     zset    unsettled lease id -> expiry (server seconds)
--   pending  hash    account -> leases that count against it
--   busy     hash    account -> tick of its 429
--   busyroom hash    account -> the room the snapshot showed at its 429, until an answer
--                    showing the same room was let pass once
--   quar     hash    account -> {u: until (server seconds), r: reason}
--   mquar    hash    [account, model] (JSON) -> {u, r}: out of rotation for that model only
--   queue    zset    score -priority, member "<16-digit arrival>:<waiter id>"
--   wait     hash    waiter id -> {m: queue member, al: allowed accounts, o: owner}
--   whb      zset    waiter id -> heartbeat expiry
--   granted  hash    waiter id -> [lease id, account], until the lease ends
--   gone     zset    waiter id -> when it left (never enqueued again)
--   lost     zset    reclaimed lease id -> when (its holder's renewal is told it is lost)
--   lock     string  the poll lock (SET NX PX)
--   ev       pubsub  wake-ups: '*' for everyone, else the owners that were granted

local P = KEYS[1]
local M = P .. 'meta'
local A = cjson.decode(ARGV[1])
local KEYS_OF_FLEET = {'meta', 'limit', 'order', 'jobs', 'watch', 'lags', 'lease', 'lexp',
  'pending', 'busy', 'busyroom', 'quar', 'mquar', 'queue', 'wait', 'whb', 'granted', 'gone',
  'lost', 'lock'}

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local NOW = A.now or server_now()
local function num(v, d) if v then return tonumber(v) end return d end
local function mget(f, d) return num(redis.call('HGET', M, f), d) end
local function tick() return redis.call('HINCRBY', M, 'tick', 1) end

-- A new epoch begins when the data is gone (a restart without persistence, a flush); a new
-- server run_id with the data still there (a restart that reloaded an older snapshot) starts
-- a grace too. Either way nothing is granted for `grace` seconds while live holders
-- re-assert their leases.
-- Returns the epoch, and the generation: the epoch and the server's run_id, which changes
-- on either (a poll begun in another generation counts its ticks from another origin).
local function ensure_epoch()
  local info = redis.pcall('INFO', 'server')  -- INFO may be renamed away: then no run_id
  local rid = type(info) == 'string' and string.match(info, 'run_id:(%w+)') or ''
  local e = redis.call('HGET', M, 'epoch')
  if e then
    if redis.call('HGET', M, 'run_id') ~= rid then
      -- a failover or a reload may have lost the latest writes (settles among them): poll
      -- afresh, so the next grants rest on an answer requested after this instant
      redis.call('HSET', M, 'run_id', rid, 'grace_until', NOW + A.grace, 'fresh_until', 0,
        'next_poll_at', 0)
    end
    return e, e .. '/' .. rid
  end
  local t = redis.call('TIME')
  e = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', M, 'epoch', e, 'run_id', rid, 'grace_until', NOW + A.grace,
    'fresh_until', 0, 'next_poll_at', 0, 'last_sent', 0, 'failures', 0, 'polls', 0,
    'polls_failed', 0, 'sent_tick', 0)
  return e, e .. '/' .. rid
end

local function lease_get(id)
  local v = redis.call('HGET', P .. 'lease', id)
  if v then return cjson.decode(v) end
  return nil
end
local function lease_put(id, rec) redis.call('HSET', P .. 'lease', id, cjson.encode(rec)) end
local function pend_add(a, n)
  local v = redis.call('HINCRBY', P .. 'pending', a, n)
  if v <= 0 then redis.call('HDEL', P .. 'pending', a) end
end
local function clear_grant(rec, id)
  if rec.w then
    local g = redis.call('HGET', P .. 'granted', rec.w)
    if g and cjson.decode(g)[1] == id then redis.call('HDEL', P .. 'granted', rec.w) end
  end
end
local function drop_lease(id, rec)
  redis.call('HDEL', P .. 'lease', id)
  redis.call('ZREM', P .. 'lexp', id)
  pend_add(rec.a, -1)
  clear_grant(rec, id)
end
local function remove_waiter(wid)
  local w = redis.call('HGET', P .. 'wait', wid)
  if w then
    redis.call('ZREM', P .. 'queue', cjson.decode(w).m)
    redis.call('HDEL', P .. 'wait', wid)
  end
  redis.call('ZREM', P .. 'whb', wid)
end

local PUB = {}
local PUB_ALL = false
-- every script ends here: wake whom it concerns, and keep the fleet's keys alive
local function finish()
  if PUB_ALL then
    redis.call('PUBLISH', P .. 'ev', '*')
  elseif #PUB > 0 then
    redis.call('PUBLISH', P .. 'ev', table.concat(PUB, ','))
  end
  local ms = math.floor(A.idle * 1000)
  for _, k in ipairs(KEYS_OF_FLEET) do
    if k ~= 'lock' then redis.call('PEXPIRE', P .. k, ms) end
  end
end

-- like gate.invalidate(): the snapshot stops serving, poll as soon as the floor allows
local function soon_poll(floor)
  if mget('failures', 0) > 0 then return end
  local soonest = math.max(NOW, mget('last_sent', 0) + floor)
  if soonest < mget('next_poll_at', 0) then redis.call('HSET', M, 'next_poll_at', soonest) end
  if soonest < mget('fresh_until', 0) then redis.call('HSET', M, 'fresh_until', soonest) end
  PUB_ALL = true
end

-- leases whose holder stopped renewing become settled now: they count until a snapshot
-- requested after this instant (the holder may have created its job before it stopped);
-- a reclaimed lease is never re-created by its holder's renewal (it learns it is lost)
local function reclaim()
  local ids = redis.call('ZRANGEBYSCORE', P .. 'lexp', '-inf', NOW)
  local changed = false
  local dead = {}
  for _, id in ipairs(ids) do
    redis.call('ZREM', P .. 'lexp', id)
    local rec = lease_get(id)
    if rec and not rec.s then
      rec.s = tick()
      rec.t = NOW
      rec.r = 1
      lease_put(id, rec)
      clear_grant(rec, id)
      redis.call('ZADD', P .. 'lost', NOW, id)
      changed = true
      if rec.o then dead[rec.o] = true end
    end
  end
  -- a process that stopped renewing its leases is gone: so are its waiters (else they
  -- would be granted the reclaimed slots and hold them for another heartbeat)
  if next(dead) then
    local flat = redis.call('HGETALL', P .. 'wait')
    for i = 1, #flat, 2 do
      if dead[cjson.decode(flat[i + 1]).o] then remove_waiter(flat[i]) end
    end
  end
  -- no floor here: reclaims are rare, and the slots come back only with the next poll
  if changed then soon_poll(0) end
  for _, wid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'whb', '-inf', NOW)) do
    remove_waiter(wid)
  end
  redis.call('ZREMRANGEBYSCORE', P .. 'gone', '-inf', NOW - 3600)
  redis.call('ZREMRANGEBYSCORE', P .. 'lost', '-inf', NOW - A.idle)
end

local function quarantined(a)
  local q = redis.call('HGET', P .. 'quar', a)
  if not q then return nil end
  local qd = cjson.decode(q)
  if NOW >= qd.u then
    redis.call('HDEL', P .. 'quar', a)
    return nil
  end
  return qd
end

-- the accounts out of rotation for `model` (a waiter's job model); expired entries go
local function model_blocked(model)
  local out = {}
  local flat = redis.call('HGETALL', P .. 'mquar')
  for i = 1, #flat, 2 do
    local key, qd = cjson.decode(flat[i]), cjson.decode(flat[i + 1])
    if NOW >= qd.u then
      redis.call('HDEL', P .. 'mquar', flat[i])
    elseif key[2] == model then
      out[key[1]] = true
    end
  end
  return out
end

local function hash_num(key)
  local flat = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = tonumber(flat[i + 1]) end
  return out
end

local function free_map()
  local order = redis.call('LRANGE', P .. 'order', 0, -1)
  local lim = hash_num(P .. 'limit')
  local pend = hash_num(P .. 'pending')
  local busy = hash_num(P .. 'busy')
  local free, total = {}, 0
  for _, a in ipairs(order) do
    local n = (lim[a] or 0) - (pend[a] or 0)
    if n > 0 and not busy[a] and not quarantined(a) then
      free[a] = n
      total = total + n
    end
  end
  return order, free, total
end

-- One pass over the fleet's queue, in order: the earliest eligible waiter gets each slot.
-- The strategies are capgate._strategy's, the same rule by rule (the conformance suite
-- holds them equal). A grant lives as long as its waiter's heartbeat: until its owner
-- picks it up and renews it as a lease, a dead process's grant expires with its waiters.
local function dispatch(epoch)
  if NOW < mget('grace_until', 0) or NOW >= mget('fresh_until', 0) then return 0 end
  if redis.call('ZCARD', P .. 'queue') == 0 then return 0 end
  local order, free, total = free_map()
  if total <= 0 then return 0 end
  local rank, seq = {}, {}
  for _, a in ipairs(A.pref) do
    if not rank[a] then seq[#seq + 1] = a; rank[a] = #seq end
  end
  for _, a in ipairs(order) do
    if not rank[a] then seq[#seq + 1] = a; rank[a] = #seq end
  end
  local rr_last = redis.call('HGET', M, 'rr_last')
  local owners, count, blocked = {}, 0, {}
  for _, m in ipairs(redis.call('ZRANGE', P .. 'queue', 0, -1)) do
    if total <= 0 then break end
    local wid = string.sub(m, 18)
    local w = redis.call('HGET', P .. 'wait', wid)
    if not w then
      redis.call('ZREM', P .. 'queue', m)
    else
      local wd = cjson.decode(w)
      local allowed = nil
      if type(wd.al) == 'table' then
        allowed = {}
        for _, a in ipairs(wd.al) do allowed[a] = true end
      end
      if wd.md then
        -- a waiter for one model may not use the accounts quarantined for that model
        blocked[wd.md] = blocked[wd.md] or model_blocked(wd.md)
        if next(blocked[wd.md]) then
          local base = allowed
          allowed = {}
          for _, a in ipairs(seq) do
            if (not base or base[a]) and not blocked[wd.md][a] then allowed[a] = true end
          end
        end
      end
      local pick = nil
      if A.strategy == 'first_fit' then
        for _, a in ipairs(seq) do
          if free[a] and (not allowed or allowed[a]) then pick = a; break end
        end
      elseif A.strategy == 'round_robin' then
        local first, after = nil, nil
        local lr = rr_last and rank[rr_last]
        for _, a in ipairs(seq) do
          if free[a] and (not allowed or allowed[a]) then
            if not first then first = a end
            if lr and not after and rank[a] > lr then after = a end
          end
        end
        pick = after or first
      else
        local best = 0
        for _, a in ipairs(seq) do
          local n = free[a]
          if n and n > best and (not allowed or allowed[a]) then best = n; pick = a end
        end
      end
      if pick then
        free[pick] = free[pick] - 1
        if free[pick] <= 0 then free[pick] = nil end
        total = total - 1
        rr_last = pick
        local id = epoch .. '-' .. redis.call('HINCRBY', M, 'lid', 1)
        lease_put(id, {a = pick, w = wid, o = wd.o})
        local hb = redis.call('ZSCORE', P .. 'whb', wid)
        redis.call('ZADD', P .. 'lexp', hb and tonumber(hb) or (NOW + A.ttl), id)
        pend_add(pick, 1)
        redis.call('HSET', P .. 'granted', wid, cjson.encode({id, pick}))
        redis.call('ZREM', P .. 'queue', m)
        redis.call('HDEL', P .. 'wait', wid)
        redis.call('ZREM', P .. 'whb', wid)
        if not owners[wd.o] then owners[wd.o] = true; PUB[#PUB + 1] = wd.o end
        count = count + 1
      end
    end
  end
  if rr_last then redis.call('HSET', M, 'rr_last', rr_last) end
  return count
end

-- the shared state, as a client caches it (times relative to NOW)
local function state(known_tick)
  local s = {}
  s.fresh_in = mget('fresh_until', 0) - NOW
  s.poll_in = mget('next_poll_at', 0) - NOW
  s.grace_in = mget('grace_until', 0) - NOW
  s.sent_tick = mget('sent_tick', 0)
  s.snap_age = NOW - mget('sent_at', NOW)
  if s.sent_tick ~= known_tick then s.snap = redis.call('HGET', M, 'snap') or false end
  s.waiting = redis.call('ZCARD', P .. 'queue')
  s.held = redis.call('ZCARD', P .. 'lexp')
  s.reserved = redis.call('HLEN', P .. 'lease')
  s.pending = hash_num(P .. 'pending')
  s.limit = hash_num(P .. 'limit')
  s.busy = redis.call('HKEYS', P .. 'busy')
  local q = {}
  local flat = redis.call('HGETALL', P .. 'quar')
  for i = 1, #flat, 2 do
    local qd = cjson.decode(flat[i + 1])
    if NOW < qd.u then q[flat[i]] = {qd.u - NOW, qd.r} end
  end
  s.quar = q
  local mq = {}
  flat = redis.call('HGETALL', P .. 'mquar')
  for i = 1, #flat, 2 do
    local key, qd = cjson.decode(flat[i]), cjson.decode(flat[i + 1])
    if NOW < qd.u then mq[#mq + 1] = {key[1], key[2], qd.u - NOW, qd.r} end
  end
  s.mquar = mq
  s.lag = mget('lag', 0)
  s.polls = mget('polls', 0)
  s.polls_failed = mget('polls_failed', 0)
  s.failures = mget('failures', 0)
  s.last_error = redis.call('HGET', M, 'last_error') or false
  s.auth_at = redis.call('HGET', M, 'auth_at') or false
  if s.auth_at then
    s.auth_age = NOW - tonumber(s.auth_at)
    s.auth_msg = redis.call('HGET', M, 'auth_msg') or ''
    s.auth_status = mget('auth_status', 0)
  end
  s.epoch = redis.call('HGET', M, 'epoch')
  return s
end
