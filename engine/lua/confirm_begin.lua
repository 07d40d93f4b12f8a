-- confirm_begin: mark a live hold "confirming" before PostgreSQL is asked to book it.
-- A confirming hold still counts as taken, is never reclaimed by its deadline, and is settled
-- by confirm_done, confirm_abort, or the sweeper (from PostgreSQL's answer).
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 clients, 7 confirms (see lib.lua)
-- ARGV: 1 hold id, 2 now_ms
-- Returns: {'confirming', slot}  the caller may now run the booking transaction
--          {'gone'}              no such hold, or it expired (an expired one is reclaimed now)
local function confirm_begin(keys, argv)
  local inv, holds, confirming, hold, idem, clients, confirms = unpack(keys)
  local hold_id, now = argv[1], tonumber(argv[2])
  local rec = redis.call('HGET', hold, hold_id)
  if not rec then
    return { 'gone' }
  end
  local h = split_hold(rec)
  if h.state == 'h' then
    if h.deadline <= now then
      drop_hold(inv, holds, confirming, hold, idem, clients, hold_id, h)
      return { 'gone' }
    end
    h.state = 'c'
    redis.call('HSET', hold, hold_id, join_hold(h))
    redis.call('ZREM', holds, hold_id)
  else
    -- Another confirm of it is under way: counted, so that a refusal of either does not
    -- hand the hold back while the other may still book it (confirm_abort).
    redis.call('HINCRBY', confirms, hold_id, 1)
  end
  -- A second confirm (a retry after a crash or a timeout) restarts the grace period.
  redis.call('ZADD', confirming, now, hold_id)
  return { 'confirming', h.slot }
end
