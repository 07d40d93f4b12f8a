-- withdraw: PostgreSQL is cancelling a booking of `slot` and taking its place off the slot
-- (the slot's capacity one lower, staff's "place withdrawn"): lower the capacity by one.
-- Called as lower_capacity is, while PostgreSQL holds the slot's row, before it commits; but
-- with no floor to check: the booking cancelled frees the place this takes. From here until
-- cancel_done (after the commit) stops counting the booking, the slot offers one place
-- fewer than PostgreSQL has: never more. A rollback, or a crash before cancel_done, leaves
-- Redis that way until the reconcile.
-- Sets the fence as lower_capacity does, also when the inventory is missing: a write of
-- capacities from a snapshot read before this must set none.
-- KEYS: 1 inv, 2 fence (see lib.lua)
-- ARGV: 1 slot, 2 the fence's new value
-- Returns: {'withdrawn'}
--          {'rebuild'}  the inventory is missing: the rebuild reads PostgreSQL
local function withdraw(keys, argv)
  local inv, fence = unpack(keys)
  local slot = argv[1]
  redis.call('SET', fence, argv[2])
  if redis.call('EXISTS', inv) == 0 then
    return { 'rebuild' }
  end
  if redis.call('HEXISTS', inv, 'c:' .. slot) == 1 then
    redis.call('HINCRBY', inv, 'c:' .. slot, -1)
  end
  return { 'withdrawn' }
end
