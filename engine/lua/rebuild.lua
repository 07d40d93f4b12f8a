-- rebuild: recreate a lost release inventory from PostgreSQL's snapshot.
-- Runs only if the inventory is still missing (another worker may have rebuilt it first), and
-- the fence has not moved since the snapshot was read (a capacity was lowered meanwhile, while
-- the inventory was missing: the snapshot may be older than that change).
-- Holds are soft state: whatever is left of them is dropped; spent challenges are kept.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 booked, 7 clients, 8 confirms,
--       9 fence (see lib.lua)
-- ARGV: 1 the fence read with the snapshot, 2 number of slots n, then n times (slot id,
--       capacity), then pairs (reference, slot id) of the active bookings
-- Returns: {'rebuilt'}, {'present'} or {'stale'}
local function rebuild(keys, argv)
  local inv, holds, confirming, hold, idem, booked, clients, confirms, fence = unpack(keys)
  if redis.call('EXISTS', inv) == 1 then
    return { 'present' }
  end
  if redis.call('GET', fence) ~= argv[1] then  -- GET gives false for a lost fence
    return { 'stale' }
  end
  redis.call('DEL', holds, confirming, hold, idem, booked, clients, confirms)
  local n = tonumber(argv[2])
  redis.call('HSET', inv, 'ready', 1)
  for i = 0, n - 1 do
    local slot, capacity = argv[3 + 2 * i], argv[4 + 2 * i]
    redis.call('HSET', inv, 'c:' .. slot, capacity, 'b:' .. slot, 0, 'h:' .. slot, 0)
  end
  for i = 3 + 2 * n, #argv, 2 do
    local ref, slot = argv[i], argv[i + 1]
    if redis.call('HSET', booked, ref, slot) == 1 then
      redis.call('HINCRBY', inv, 'b:' .. slot, 1)
    end
  end
  return { 'rebuilt' }
end
