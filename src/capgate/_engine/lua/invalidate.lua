-- invalidate: the snapshot stops serving; poll as soon as the floor allows.
-- KEYS[1] - the fleet's prefix
-- ARGV[1] - {floor, grace, idle}
-- returns  - '{}'
ensure_epoch()
soon_poll(A.floor)
-- the answer of a poll already on the wire may predate this news: remember it
if redis.call('EXISTS', P .. 'lock') == 1 then redis.call('HSET', M, 'inval', 1) end
finish()
return '{}'
