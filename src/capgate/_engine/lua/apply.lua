-- apply: take a poll's answer (unless a newer one landed first), release the lock, dispatch.
-- The accounting rule of capgate._engine.ledger, on the fleet's leases.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {token, tick, gen, sent, spacing, snap (the snapshot as JSON), limits: [[account,
--            room before reservations], ...], jobs: [job ids executing], floor,
--            lag_margin, lag_samples, watch_for, watch_max, owner, ttl, strategy, pref,
--            grace, idle}
-- returns  - JSON {applied: whether this answer is now the fleet's snapshot}
-- An answer to a poll begun before the fleet's latest snapshot's (a poller paused past its
-- lock), or in another generation (begun before Redis lost its data or restarted: its tick
-- counts from another origin, and the settles since would look older than it), never
-- replaces it: it is counted in meta.polls_late and dropped.
local epoch, gen = ensure_epoch()
local st, sent = A.tick, tonumber(A.sent)
local current = A.gen == gen
if current and st > mget('sent_tick', 0) then
  redis.call('DEL', P .. 'limit', P .. 'order', P .. 'jobs')
  for _, row in ipairs(A.limits) do
    redis.call('HSET', P .. 'limit', row[1], row[2])
    redis.call('RPUSH', P .. 'order', row[1])
  end
  for i = 1, #A.jobs, 500 do
    redis.call('SADD', P .. 'jobs', unpack(A.jobs, i, math.min(i + 499, #A.jobs)))
  end
  -- the next poll is due a spacing after the request was sent, and the answer serves
  -- grants for a spacing after it arrived (a slow answer is still the newest)
  redis.call('HSET', M, 'sent_tick', st, 'sent_at', sent, 'snap', A.snap,
    'fresh_until', NOW + A.spacing, 'next_poll_at', sent + A.spacing, 'failures', 0)
  if redis.call('HDEL', M, 'inval') == 1 then
    -- invalidated while this poll was in flight: its answer must not push the next poll
    -- back to a full interval, but it serves meanwhile (an ended job only frees room; a
    -- stale answer would starve the waiters of a slow service while callbacks come)
    local soonest = math.max(NOW, sent + A.floor)
    redis.call('HSET', M, 'next_poll_at', math.min(sent + A.spacing, soonest))
  end
  redis.call('HDEL', M, 'last_error', 'auth_at', 'auth_msg', 'auth_status')
  redis.call('HINCRBY', M, 'polls', 1)
  local function listed(j) return redis.call('SISMEMBER', P .. 'jobs', j) == 1 end
  local function learn(evidence)
    if evidence <= 0 then return end
    redis.call('LPUSH', P .. 'lags', evidence)
    redis.call('LTRIM', P .. 'lags', 0, A.lag_samples - 1)
    local most = 0
    for _, v in ipairs(redis.call('LRANGE', P .. 'lags', 0, -1)) do
      most = math.max(most, tonumber(v))
    end
    redis.call('HSET', M, 'lag', most)
  end
  local flat = redis.call('HGETALL', P .. 'lease')
  -- this snapshot's own evidence of lag counts for what it releases
  for i = 1, #flat, 2 do
    local rec = cjson.decode(flat[i + 1])
    if rec.s and rec.j and rec.m and listed(rec.j) then learn(sent - (rec.t or sent)) end
  end
  local watch = redis.call('HGETALL', P .. 'watch')
  for i = 1, #watch, 2 do
    local t = tonumber(watch[i + 1])
    if listed(watch[i]) then
      learn(sent - t)
      redis.call('HDEL', P .. 'watch', watch[i])
    elseif sent - t > A.watch_for then
      redis.call('HDEL', P .. 'watch', watch[i])
    end
  end
  local allowance = mget('lag', 0) * A.lag_margin
  for i = 1, #flat, 2 do
    local rec = cjson.decode(flat[i + 1])
    if rec.s then
      local t = rec.t or sent
      if rec.j and listed(rec.j) then
        drop_lease(flat[i], rec)
      elseif rec.s < st then
        if allowance > 0 and sent - t <= allowance then
          rec.m = sent  -- the counts lag: keep counting it for now
          lease_put(flat[i], rec)
        else
          if rec.j then redis.call('HSET', P .. 'watch', rec.j, t) end
          drop_lease(flat[i], rec)
        end
      end
    end
  end
  if redis.call('HLEN', P .. 'watch') > A.watch_max then
    local rest = redis.call('HGETALL', P .. 'watch')
    local items = {}
    for i = 1, #rest, 2 do items[#items + 1] = {rest[i], tonumber(rest[i + 1])} end
    table.sort(items, function(x, y) return x[2] < y[2] end)
    for k = 1, #items - A.watch_max do redis.call('HDEL', P .. 'watch', items[k][1]) end
  end
  local busy = redis.call('HGETALL', P .. 'busy')
  for i = 1, #busy, 2 do
    if tonumber(busy[i + 1]) < st then
      -- an answer that shows the account as the one the 429 contradicted is no news
      -- against it (counts that lag, before the lag is known): the mark outlasts one such
      -- answer, and no more
      local shown = redis.call('HGET', P .. 'busyroom', busy[i])
      redis.call('HDEL', P .. 'busyroom', busy[i])
      local now_shown = redis.call('HGET', P .. 'limit', busy[i]) or ''
      if not (shown and shown == now_shown) then redis.call('HDEL', P .. 'busy', busy[i]) end
    end
  end
  PUB_ALL = true
else
  redis.call('HINCRBY', M, 'polls_late', 1)
end
if redis.call('GET', P .. 'lock') == A.token then redis.call('DEL', P .. 'lock') end
reclaim()
dispatch(epoch)
finish()
return cjson.encode({applied = current and st >= mget('sent_tick', 0)})
