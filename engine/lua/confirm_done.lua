-- confirm_done: PostgreSQL committed booking `ref` for this hold; count it as booked.
-- Idempotent, and correct even when the hold record is gone (reclaimed by the sweeper, or
-- lost with Redis): the booking is counted once, by its reference.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 booked, 7 clients, 8 confirms
--       (see lib.lua)
-- ARGV: 1 hold id ('' for a staff booking), 2 slot id, 3 booking reference
-- Returns: {'done', counted}  counted = 1 if the booking was new to Redis
--          {'rebuild'}        the inventory is missing; the rebuild will read PostgreSQL
local function confirm_done(keys, argv)
  local inv, holds, confirming, hold, idem, booked, clients, confirms = unpack(keys)
  local hold_id, slot, ref = argv[1], argv[2], argv[3]
  if redis.call('EXISTS', inv) == 0 then
    return { 'rebuild' }
  end
  if hold_id ~= '' then
    redis.call('HDEL', confirms, hold_id)
    local rec = redis.call('HGET', hold, hold_id)
    if rec then
      drop_hold(inv, holds, confirming, hold, idem, clients, hold_id, split_hold(rec))
    end
  end
  local counted = redis.call('HSET', booked, ref, slot)
  if counted == 1 then
    redis.call('HINCRBY', inv, 'b:' .. slot, 1)
  end
  return { 'done', counted }
end
