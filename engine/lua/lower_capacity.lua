-- lower_capacity: lower slots' capacities, each never below the places booked or held,
-- atomically with the holds: a hold decided after this sees the lower capacity, and every
-- hold granted before it is counted. Staff's capacity change calls it while PostgreSQL holds
-- the slots' rows, before the change commits; a raise is not done here but after the commit
-- (a place Redis gave before PostgreSQL had it could not be confirmed).
-- Each call that is not refused, and each that finds the inventory missing, sets the fence to a
-- new value: a write of capacities from a snapshot read before it (one that reaches Redis late)
-- then sets none.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 clients, 7 fence (see lib.lua)
-- ARGV: 1 now_ms, 2 reclaim limit, 3 the fence's new value, then n times (slot id, new
--       capacity, bookings PostgreSQL has on the slot)
-- Returns: {'lowered'}
--          {'refused', slot, floor, ...}  each slot whose new capacity is below its floor
--                                         (booked + held); nothing changed
--          {'rebuild'}  the inventory is missing: no hold lives, nothing to lower
local function lower_capacity(keys, argv)
  local inv, holds, confirming, hold, idem, clients, fence = unpack(keys)
  if redis.call('EXISTS', inv) == 0 then
    redis.call('SET', fence, argv[3])
    return { 'rebuild' }
  end
  reclaim(inv, holds, confirming, hold, idem, clients, tonumber(argv[1]), tonumber(argv[2]))
  local refused = {}
  local lower = {}
  for i = 4, #argv, 3 do
    local slot, capacity, pg_booked = argv[i], tonumber(argv[i + 1]), tonumber(argv[i + 2])
    local current = tonumber(redis.call('HGET', inv, 'c:' .. slot) or '-1')
    local floor = math.max(tonumber(redis.call('HGET', inv, 'b:' .. slot) or '0'), pg_booked)
        + tonumber(redis.call('HGET', inv, 'h:' .. slot) or '0')
    if capacity < floor then
      table.insert(refused, slot)
      table.insert(refused, floor)
    elseif capacity < current then
      table.insert(lower, { slot, capacity })
    end
  end
  if #refused > 0 then
    table.insert(refused, 1, 'refused')
    return refused
  end
  for _, change in ipairs(lower) do
    redis.call('HSET', inv, 'c:' .. change[1], change[2])
  end
  -- Even if Redis's capacity is already this low (a raise it has not been given yet): a
  -- snapshot read before this change has the old capacity, and must not set it.
  redis.call('SET', fence, argv[3])
  return { 'lowered' }
end
