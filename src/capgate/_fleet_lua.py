"""The Lua scripts of fleet mode (see ``capgate._fleet`` for the design).

Every script starts with :data:`COMMON`: helpers, the server time ``NOW`` from ``TIME``,
lease reclaim and the dispatch pass. ``KEYS[1]`` is the gate's key prefix (it carries a
``{hash}`` tag, so every key lives in one cluster slot); all other input is in ``ARGV``.
Every script is idempotent per lease id and waiter id, so a call retried after a lost reply
never grants or counts anything twice.

Keys under the prefix ``P``:

=============  ======  ==========================================================
``meta``       hash    epoch, run_id, grace_until, tick, lid, arrivals, sent_tick, sent_at,
                       fresh_until, next_poll_at, last_sent, failures, polls,
                       polls_failed, last_error, auth_at/auth_msg/auth_status,
                       rr_last, grants, snap (the latest snapshot as JSON)
``limit``      hash    account -> slots the latest snapshot allows (cap applied)
``order``      list    accounts in the snapshot's order
``jobs``       set     job ids the latest snapshot lists as executing
``watch``      hash    job id dropped by the tick rule -> settle time (lag evidence)
``lags``       list    the latest 32 lags seen (``meta.lag`` is their maximum)
``lease``      hash    lease id -> {a: account, w: waiter id, o: owner, s: settle tick,
                       t: settle time, j: job id, m: missed by a lagging snapshot,
                       r: reclaimed}
``lexp``       zset    unsettled lease id -> expiry (server seconds)
``pending``    hash    account -> leases that count against it
``busy``       hash    account -> tick of its 429
``quar``       hash    account -> {u: until (server seconds), r: reason}
``queue``      zset    score -priority, member "<16-digit arrival>:<waiter id>"
``wait``       hash    waiter id -> {m: queue member, al: allowed accounts, o: owner}
``whb``        zset    waiter id -> heartbeat expiry
``granted``    hash    waiter id -> [lease id, account], until the lease ends
``gone``       zset    waiter id -> when it left (never enqueued again)
``lock``       string  the poll lock (SET NX PX)
``ev``         pubsub  wake-ups: ``*`` for everyone, else the owners that were granted
=============  ======  ==========================================================
"""

from __future__ import annotations

__all__ = ["SCRIPTS"]

COMMON = r"""
local P = KEYS[1]
local M = P .. 'meta'
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local NOW = now_s()
local function num(v, d) if v then return tonumber(v) end return d end
local function mget(f, d) return num(redis.call('HGET', M, f), d) end
local function tick() return redis.call('HINCRBY', M, 'tick', 1) end

-- A new epoch begins when the data is gone (a restart without persistence, a flush); a new
-- server run_id with the data still there (a restart that reloaded a snapshot, which may be
-- older than the last grants) starts a grace too. Either way nothing is granted for `grace`
-- seconds while live holders re-assert their leases.
local function ensure_epoch(grace)
  local info = redis.pcall('INFO', 'server')  -- INFO may be renamed away: then no run_id
  local rid = type(info) == 'string' and string.match(info, 'run_id:(%w+)') or ''
  local e = redis.call('HGET', M, 'epoch')
  if e then
    if redis.call('HGET', M, 'run_id') ~= rid then
      redis.call('HSET', M, 'run_id', rid, 'grace_until', NOW + grace)
    end
    return e
  end
  local t = redis.call('TIME')
  e = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', M, 'epoch', e, 'run_id', rid, 'grace_until', NOW + grace, 'fresh_until', 0,
    'next_poll_at', 0, 'last_sent', 0, 'failures', 0, 'polls', 0, 'polls_failed', 0,
    'sent_tick', 0, 'grants', 0)
  return e
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
local function publish()
  if PUB_ALL then
    redis.call('PUBLISH', P .. 'ev', '*')
  elseif #PUB > 0 then
    redis.call('PUBLISH', P .. 'ev', table.concat(PUB, ','))
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
-- requested after this instant (the holder may have created its job before it died)
local function reclaim(floor)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'lexp', '-inf', NOW)
  local changed = false
  local dead = {}
  for _, id in ipairs(ids) do
    redis.call('ZREM', P .. 'lexp', id)
    local rec = lease_get(id)
    if rec and not rec.s then
      rec.s = tick()
      rec.r = 1
      lease_put(id, rec)
      clear_grant(rec, id)
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

-- one pass over the global queue, in order: the earliest eligible waiter gets each slot.
-- ttl is the heartbeat ttl: a grant its owner does not pick up expires as fast as a dead
-- process's waiters do; once picked up, the owner renews it as a lease
local function dispatch(epoch, ttl, strategy, pref)
  if NOW < mget('grace_until', 0) or NOW >= mget('fresh_until', 0) then return 0 end
  if redis.call('ZCARD', P .. 'queue') == 0 then return 0 end
  local order, free, total = free_map()
  if total <= 0 then return 0 end
  local rank, seq = {}, {}
  for _, a in ipairs(pref) do
    if not rank[a] then seq[#seq + 1] = a; rank[a] = #seq end
  end
  for _, a in ipairs(order) do
    if not rank[a] then seq[#seq + 1] = a; rank[a] = #seq end
  end
  local rr_last = redis.call('HGET', M, 'rr_last')
  local owners, count = {}, 0
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
      local pick = nil
      if strategy == 'first_fit' then
        for _, a in ipairs(seq) do
          if free[a] and (not allowed or allowed[a]) then pick = a; break end
        end
      elseif strategy == 'round_robin' then
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
        redis.call('ZADD', P .. 'lexp', NOW + ttl, id)
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
  redis.call('HINCRBY', M, 'grants', count)
  return count
end

-- the shared state, as the client caches it (times relative to NOW)
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
  s.grants = mget('grants', 0)
  return s
end
"""

# ARGV: owner, heartbeat ttl, grace, floor, strategy, pref (json list), known sent_tick,
#       waiters (json list of [wid, priority, allowed list or false])
SYNC = r"""
local owner, ttl, grace, floor = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = ensure_epoch(grace)
reclaim(floor)
for _, w in ipairs(cjson.decode(ARGV[8])) do
  local wid = w[1]
  if redis.call('HEXISTS', P .. 'granted', wid) == 1 then
    -- granted: nothing to do until the owner claims it
  elseif redis.call('HEXISTS', P .. 'wait', wid) == 1 then
    redis.call('ZADD', P .. 'whb', NOW + ttl, wid)
  elseif not redis.call('ZSCORE', P .. 'gone', wid) then
    local n = redis.call('HINCRBY', M, 'arrivals', 1)
    local m = string.format('%016d', n) .. ':' .. wid
    redis.call('ZADD', P .. 'queue', -tonumber(w[2]), m)
    local rec = {m = m, o = owner}
    if type(w[3]) == 'table' then rec.al = w[3] end
    redis.call('HSET', P .. 'wait', wid, cjson.encode(rec))
    redis.call('ZADD', P .. 'whb', NOW + ttl, wid)
  end
end
dispatch(epoch, ttl, ARGV[5], cjson.decode(ARGV[6]))
local out = {}
for _, w in ipairs(cjson.decode(ARGV[8])) do
  local g = redis.call('HGET', P .. 'granted', w[1])
  if g then out[w[1]] = cjson.decode(g) end
end
publish()
local s = state(tonumber(ARGV[7]))
s.granted = out
return cjson.encode(s)
"""

# ARGV: lock token, lock ms, force (0/1), grace
BEGIN_POLL = r"""
ensure_epoch(tonumber(ARGV[4]))
if ARGV[3] ~= '1' and NOW < mget('next_poll_at', 0) then
  return cjson.encode({ok = false, wait = mget('next_poll_at', 0) - NOW})
end
if not redis.call('SET', P .. 'lock', ARGV[1], 'NX', 'PX', ARGV[2]) then
  return cjson.encode({ok = false, wait = redis.call('PTTL', P .. 'lock') / 1000})
end
local st = tick()
redis.call('HSET', M, 'last_sent', NOW)
redis.call('HDEL', M, 'inval')
return cjson.encode({ok = true, tick = st, sent = tostring(NOW)})
"""

# ARGV: lock token, sent tick, sent (server seconds, as text), spacing, snapshot json,
#       limits (json list of [account, limit]), job ids (json list), owner, ttl, grace, floor,
#       strategy, pref
APPLY = r"""
local epoch = ensure_epoch(tonumber(ARGV[10]))
local st, sent = tonumber(ARGV[2]), tonumber(ARGV[3])
if st > mget('sent_tick', 0) then
  redis.call('DEL', P .. 'limit', P .. 'order', P .. 'jobs')
  for _, row in ipairs(cjson.decode(ARGV[6])) do
    redis.call('HSET', P .. 'limit', row[1], row[2])
    redis.call('RPUSH', P .. 'order', row[1])
  end
  local jobs = cjson.decode(ARGV[7])
  for i = 1, #jobs, 500 do
    redis.call('SADD', P .. 'jobs', unpack(jobs, i, math.min(i + 499, #jobs)))
  end
  -- as in-process: the next poll is due a spacing after the request was sent, and the
  -- answer serves grants for a spacing after it arrived (a slow answer is still the newest)
  local spacing = tonumber(ARGV[4])
  redis.call('HSET', M, 'sent_tick', st, 'sent_at', sent, 'snap', ARGV[5],
    'fresh_until', NOW + spacing, 'next_poll_at', sent + spacing, 'failures', 0)
  if redis.call('HDEL', M, 'inval') == 1 then
    -- invalidated while this poll was in flight: its answer must not push the next poll
    -- back to a full interval
    local soonest = math.max(NOW, sent + tonumber(ARGV[11]))
    redis.call('HSET', M, 'next_poll_at', math.min(sent + spacing, soonest),
      'fresh_until', math.min(NOW + spacing, soonest))
  end
  redis.call('HDEL', M, 'last_error', 'auth_at', 'auth_msg', 'auth_status')
  redis.call('HINCRBY', M, 'polls', 1)
  -- rule 2, with the local ledger's lag learning: once a job id dropped by the tick rule
  -- was listed later (the counts lag), leases with job ids count until listed or `lag` old
  local function learn(evidence)
    if evidence <= 0 then return end
    redis.call('LPUSH', P .. 'lags', evidence)
    redis.call('LTRIM', P .. 'lags', 0, 31)
    local most = 0
    for _, v in ipairs(redis.call('LRANGE', P .. 'lags', 0, -1)) do
      most = math.max(most, tonumber(v))
    end
    redis.call('HSET', M, 'lag', most)
  end
  local allowance = mget('lag', 0)
  local flat = redis.call('HGETALL', P .. 'lease')
  for i = 1, #flat, 2 do
    local rec = cjson.decode(flat[i + 1])
    if rec.s then
      local t = rec.t or sent
      if rec.j and redis.call('SISMEMBER', P .. 'jobs', rec.j) == 1 then
        if rec.m then learn(sent - t) end
        drop_lease(flat[i], rec)
      elseif rec.s < st then
        if rec.j and allowance > 0 and sent - t <= allowance then
          rec.m = sent
          lease_put(flat[i], rec)
        else
          if rec.j then redis.call('HSET', P .. 'watch', rec.j, t) end
          drop_lease(flat[i], rec)
        end
      end
    end
  end
  local watch = redis.call('HGETALL', P .. 'watch')
  for i = 1, #watch, 2 do
    local t = tonumber(watch[i + 1])
    if redis.call('SISMEMBER', P .. 'jobs', watch[i]) == 1 then
      learn(sent - t)
      redis.call('HDEL', P .. 'watch', watch[i])
    elseif sent - t > 600 then
      redis.call('HDEL', P .. 'watch', watch[i])
    end
  end
  if redis.call('HLEN', P .. 'watch') > 1024 then
    local rest = redis.call('HGETALL', P .. 'watch')
    local items = {}
    for i = 1, #rest, 2 do items[#items + 1] = {rest[i], tonumber(rest[i + 1])} end
    table.sort(items, function(x, y) return x[2] < y[2] end)
    for k = 1, #items - 1024 do redis.call('HDEL', P .. 'watch', items[k][1]) end
  end
  local busy = redis.call('HGETALL', P .. 'busy')
  for i = 1, #busy, 2 do
    if tonumber(busy[i + 1]) < st then redis.call('HDEL', P .. 'busy', busy[i]) end
  end
  PUB_ALL = true
end
if redis.call('GET', P .. 'lock') == ARGV[1] then redis.call('DEL', P .. 'lock') end
reclaim(tonumber(ARGV[11]))
dispatch(epoch, tonumber(ARGV[9]), ARGV[12], cjson.decode(ARGV[13]))
publish()
return cjson.encode({applied = st >= mget('sent_tick', 0)})
"""

# ARGV: lock token, auth (0/1), message, status, poll_interval, max_backoff, u in [0, 1),
#       retry_after (or ''), grace
POLL_FAILED = r"""
ensure_epoch(tonumber(ARGV[9]))
local interval = tonumber(ARGV[5])
redis.call('HINCRBY', M, 'polls_failed', 1)
redis.call('HSET', M, 'last_error', ARGV[3])
local delay
if ARGV[2] == '1' then
  redis.call('HSET', M, 'auth_at', NOW, 'auth_msg', ARGV[3], 'auth_status', ARGV[4])
  delay = interval
else
  local f = redis.call('HINCRBY', M, 'failures', 1)
  local ceiling = math.min(tonumber(ARGV[6]), interval * 2 ^ math.min(f, 30))
  delay = interval + tonumber(ARGV[7]) * (math.max(interval, ceiling) - interval)
  if ARGV[8] ~= '' then delay = math.max(delay, math.min(tonumber(ARGV[8]), 3600)) end
end
redis.call('HSET', M, 'next_poll_at', NOW + delay)
if redis.call('GET', P .. 'lock') == ARGV[1] then redis.call('DEL', P .. 'lock') end
PUB_ALL = true
publish()
return cjson.encode({delay = delay})
"""

# ARGV: lock token
UNLOCK = r"""
if redis.call('GET', P .. 'lock') == ARGV[1] then redis.call('DEL', P .. 'lock') end
PUB_ALL = true
publish()
return '{}'
"""

# ARGV: op, lease id, account, job id, waiter id, seconds, reason,
#       owner, heartbeat ttl, grace, floor, strategy, pref (op 'unlock': the token in reason)
OP = r"""
local op, id, account = ARGV[1], ARGV[2], ARGV[3]
local ttl, floor = tonumber(ARGV[9]), tonumber(ARGV[11])
local epoch = ensure_epoch(tonumber(ARGV[10]))
reclaim(floor)
local changed = false
if op == 'settle' then
  local rec = lease_get(id)
  if not rec then
    -- lost with Redis's data: count it again until a snapshot sent after now
    rec = {a = account, w = ARGV[5], o = ARGV[8]}
    pend_add(account, 1)
  end
  if not rec.s or rec.r then
    rec.s = tick()
    rec.t = NOW
    rec.r = nil
    if ARGV[4] ~= '' then rec.j = ARGV[4] end
    redis.call('ZREM', P .. 'lexp', id)
    clear_grant(rec, id)
    if rec.j and redis.call('SISMEMBER', P .. 'jobs', rec.j) == 1 then
      drop_lease(id, rec)
      changed = true
    else
      lease_put(id, rec)
    end
  end
elseif op == 'give_back' or op == 'busy' then
  local rec = lease_get(id)
  if rec then drop_lease(id, rec); changed = true end
  if op == 'busy' then redis.call('HSET', P .. 'busy', account, tick()) end
elseif op == 'abandon' then
  local wid = ARGV[5]
  remove_waiter(wid)
  redis.call('ZADD', P .. 'gone', NOW, wid)
  local g = redis.call('HGET', P .. 'granted', wid)
  if g then
    local gid = cjson.decode(g)[1]
    local rec = lease_get(gid)
    if rec and not rec.s then drop_lease(gid, rec); changed = true end
    redis.call('HDEL', P .. 'granted', wid)
  end
elseif op == 'quarantine' then
  redis.call('HSET', P .. 'quar', account, cjson.encode({u = NOW + tonumber(ARGV[6]), r = ARGV[7]}))
  PUB_ALL = true
elseif op == 'restore' then
  if redis.call('HDEL', P .. 'quar', account) == 1 then changed = true; PUB_ALL = true end
elseif op == 'invalidate' then
  soon_poll(floor)
  -- the answer of a poll already on the wire may predate this news: remember it
  if redis.call('EXISTS', P .. 'lock') == 1 then redis.call('HSET', M, 'inval', 1) end
elseif op == 'unlock' then
  if redis.call('GET', P .. 'lock') == ARGV[7] then redis.call('DEL', P .. 'lock') end
  PUB_ALL = true
end
if changed then dispatch(epoch, ttl, ARGV[12], cjson.decode(ARGV[13])) end
publish()
return '{}'
"""

# ARGV: owner, lease ttl, grace, held leases (json list of [id, account, wid]),
#       waiter ids (json), heartbeat ttl
RENEW = r"""
local owner, ttl, hb = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[6])
local epoch = ensure_epoch(tonumber(ARGV[3]))
local reasserted = 0
for _, l in ipairs(cjson.decode(ARGV[4])) do
  local id = l[1]
  local rec = lease_get(id)
  if not rec or rec.r then
    -- lost (Redis lost its data) or reclaimed while this live holder was cut off
    if not rec then
      rec = {a = l[2], w = l[3], o = owner}
      pend_add(l[2], 1)
    end
    rec.s = nil
    rec.r = nil
    lease_put(id, rec)
    reasserted = reasserted + 1
  end
  if not rec.s then redis.call('ZADD', P .. 'lexp', NOW + ttl, id) end
end
for _, wid in ipairs(cjson.decode(ARGV[5])) do
  if redis.call('HEXISTS', P .. 'wait', wid) == 1 then
    redis.call('ZADD', P .. 'whb', NOW + hb, wid)
  end
  local g = redis.call('HGET', P .. 'granted', wid)
  if g then
    local gid = cjson.decode(g)[1]
    if redis.call('ZSCORE', P .. 'lexp', gid) then
      redis.call('ZADD', P .. 'lexp', NOW + hb, gid)
    end
  end
end
return cjson.encode({reasserted = reasserted, epoch = epoch})
"""

SCRIPTS: dict[str, str] = {
    name: COMMON + body
    for name, body in {
        "sync": SYNC,
        "begin_poll": BEGIN_POLL,
        "apply": APPLY,
        "poll_failed": POLL_FAILED,
        "unlock": UNLOCK,
        "op": OP,
        "renew": RENEW,
    }.items()
}
