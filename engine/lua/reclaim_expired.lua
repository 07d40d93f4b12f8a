-- reclaim_expired: give back the places of at most `limit` expired holds, oldest first.
-- The sweeper calls it until fewer come back: a backlog (thousands of bots' holds expiring
-- together) is drained within its pass, each call short, instead of 100 a second.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 clients (see lib.lua)
-- ARGV: 1 now_ms, 2 limit
-- Returns: {'ok', reclaimed}
--          {'rebuild'}  the inventory is missing
local function reclaim_expired(keys, argv)
  local inv, holds, confirming, hold, idem, clients = unpack(keys)
  if redis.call('EXISTS', inv) == 0 then
    return { 'rebuild' }
  end
  return { 'ok', reclaim(inv, holds, confirming, hold, idem, clients, tonumber(argv[1]),
    tonumber(argv[2])) }
end
