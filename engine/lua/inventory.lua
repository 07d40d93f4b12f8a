-- inventory: reclaim expired holds, then read a release's inventory (the slot listing).
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 clients (see lib.lua)
-- ARGV: 1 now_ms, 2 reclaim limit
-- Returns: {'ok', field1, value1, field2, value2, ...}  the inv hash, after reclaiming
--          {'rebuild'}  the inventory is missing
local function inventory(keys, argv)
  local inv, holds, confirming, hold, idem, clients = unpack(keys)
  if redis.call('EXISTS', inv) == 0 then
    return { 'rebuild' }
  end
  reclaim(inv, holds, confirming, hold, idem, clients, tonumber(argv[1]), tonumber(argv[2]))
  local out = redis.call('HGETALL', inv)
  table.insert(out, 1, 'ok')
  return out
end
