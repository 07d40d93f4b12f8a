-- settle_confirm: the sweeper settles a confirm that never reported back, from PostgreSQL's
-- answer: booked (ref given) counts the booking; not booked drops the hold.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 booked, 7 clients, 8 confirms
--       (see lib.lua)
-- ARGV: 1 hold id, 2 booking reference ('' when PostgreSQL has no booking for the hold),
--       3 oldest start_ms still too young to settle (a confirm begun since is left alone)
-- Returns: {'booked'}, {'dropped'}, or {'skipped'} (settled already, or restarted since)
local function settle_confirm(keys, argv)
  local inv, holds, confirming, hold, idem, booked, clients, confirms = unpack(keys)
  local hold_id, ref, cutoff = argv[1], argv[2], tonumber(argv[3])
  local started = redis.call('ZSCORE', confirming, hold_id)
  if not started or tonumber(started) > cutoff then
    return { 'skipped' }
  end
  -- Every confirm of it is over by now (the grace period): none is under way any more.
  redis.call('HDEL', confirms, hold_id)
  local rec = redis.call('HGET', hold, hold_id)
  if not rec then
    redis.call('ZREM', confirming, hold_id)
    return { 'skipped' }
  end
  local h = split_hold(rec)
  drop_hold(inv, holds, confirming, hold, idem, clients, hold_id, h)
  if ref == '' then
    return { 'dropped' }
  end
  if redis.call('HSET', booked, ref, h.slot) == 1 then
    redis.call('HINCRBY', inv, 'b:' .. h.slot, 1)
  end
  return { 'booked' }
end
