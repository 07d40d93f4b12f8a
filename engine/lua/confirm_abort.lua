-- confirm_abort: PostgreSQL refused the booking. The hold goes back to "held" until its
-- deadline, unless another confirm of it is still under way (a second submission begun
-- meanwhile): that one may yet book it, so the hold stays confirming and is settled by it,
-- or by the sweeper from PostgreSQL's answer.
-- KEYS: 1 holds, 2 confirming, 3 hold (see lib.lua)
-- ARGV: 1 hold id
-- Returns: {'held'}, {'confirming'} (another confirm is under way), or {'gone'}
local function confirm_abort(keys, argv)
  local holds, confirming, hold = unpack(keys)
  local hold_id = argv[1]
  local rec = redis.call('HGET', hold, hold_id)
  if not rec then
    return { 'gone' }
  end
  local h = split_hold(rec)
  local others = confirms_of(h) - 1
  h.state = state_with(others)
  redis.call('HSET', hold, hold_id, join_hold(h))
  if others > 0 then
    return { 'confirming' }
  end
  redis.call('ZREM', confirming, hold_id)
  redis.call('ZADD', holds, h.deadline, hold_id)
  return { 'held' }
end
