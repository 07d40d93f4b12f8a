-- cancel_done: PostgreSQL cancelled booking `ref`; its place is free again.
-- Idempotent: a reference Redis does not count changes nothing.
-- KEYS: 1 inv, 2 booked (see lib.lua)
-- ARGV: 1 booking reference
-- Returns: {'done', uncounted}  uncounted = 1 if Redis counted the booking until now
local function cancel_done(keys, argv)
  local inv, booked = unpack(keys)
  local ref = argv[1]
  local slot = redis.call('HGET', booked, ref)
  if not slot then
    return { 'done', 0 }
  end
  redis.call('HDEL', booked, ref)
  redis.call('HINCRBY', inv, 'b:' .. slot, -1)
  return { 'done', 1 }
end
