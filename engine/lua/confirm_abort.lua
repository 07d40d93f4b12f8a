-- confirm_abort: PostgreSQL refused the booking; the hold goes back to "held" until its deadline.
-- KEYS: 1 holds, 2 confirming, 3 hold (see lib.lua)
-- ARGV: 1 hold id
-- Returns: {'held'} or {'gone'}
local function confirm_abort(keys, argv)
  local holds, confirming, hold = unpack(keys)
  local hold_id = argv[1]
  local rec = redis.call('HGET', hold, hold_id)
  if not rec then
    return { 'gone' }
  end
  local h = split_hold(rec)
  h.state = 'h'
  redis.call('HSET', hold, hold_id, join_hold(h))
  redis.call('ZREM', confirming, hold_id)
  redis.call('ZADD', holds, h.deadline, hold_id)
  return { 'held' }
end
