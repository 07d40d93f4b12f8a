-- confirm_abort: PostgreSQL refused the booking. The hold goes back to "held" until its
-- deadline, unless another confirm of it is still under way (a second submission begun
-- before this one ended): that one may yet book it, so the hold stays confirming, settled by
-- it or by the sweeper from PostgreSQL's answer.
-- KEYS: 1 holds, 2 confirming, 3 hold, 4 confirms (see lib.lua)
-- ARGV: 1 hold id
-- Returns: {'held'}, {'confirming'} (another confirm is under way), or {'gone'}
local function confirm_abort(keys, argv)
  local holds, confirming, hold, confirms = unpack(keys)
  local hold_id = argv[1]
  local rec = redis.call('HGET', hold, hold_id)
  if not rec then
    return { 'gone' }
  end
  local others = tonumber(redis.call('HGET', confirms, hold_id)) or 0
  if others > 0 then
    if others == 1 then
      redis.call('HDEL', confirms, hold_id)
    else
      redis.call('HINCRBY', confirms, hold_id, -1)
    end
    return { 'confirming' }
  end
  local h = split_hold(rec)
  h.state = 'h'
  redis.call('HSET', hold, hold_id, join_hold(h))
  redis.call('ZREM', confirming, hold_id)
  redis.call('ZADD', holds, h.deadline, hold_id)
  return { 'held' }
end
