-- reconcile: move a release's inventory toward PostgreSQL's truth, and count each correction.
-- Capacities are set; bookings PostgreSQL has and Redis lacks are counted, but for one whose
-- hold is still confirming here: that confirm is at work, and its confirm_done counts the
-- booking (or, if it never reports, the settle past the grace), while the hold keeps the
-- place counted meanwhile; bookings PostgreSQL no longer has active are uncounted; live-hold
-- counters (per slot and per client) are recounted from the hold records, but only while
-- there are at most `recount` of them. The hold functions keep those counters in step
-- atomically, so the recount is a safety net, and walking every record during a rush blocked
-- Redis for tens of milliseconds (BENCHMARKS.md); it runs again once the rush's holds have
-- expired.
-- Capacities are set only if the fence is where it was when the snapshot was read: else a
-- capacity was lowered since, and this snapshot's may be older (its call reached Redis late).
-- KEYS: 1 inv, 2 hold, 3 booked, 4 clients, 5 fence (see lib.lua)
-- ARGV: 1 recount, 2 the fence read with the snapshot, 3 number of slots n, then n times
--       (slot id, capacity), 4+2n number of additions a, then a times (reference, slot id,
--       the hold it confirmed or ''), then references to remove
-- Returns: {'reconciled', corrections, stale} (stale 1 if the capacities were left alone) or
--          {'rebuild'}
local function reconcile(keys, argv)
  local inv, hold, booked, clients, fence = unpack(keys)
  if redis.call('EXISTS', inv) == 0 then
    return { 'rebuild' }
  end
  local corrections = 0
  local recount = tonumber(argv[1])
  local stale = redis.call('GET', fence) ~= argv[2]  -- GET gives false for a lost fence
  local n = tonumber(argv[3])
  local live = {}
  for i = 0, n - 1 do
    local slot, capacity = argv[4 + 2 * i], argv[5 + 2 * i]
    if not stale and redis.call('HGET', inv, 'c:' .. slot) ~= capacity then
      redis.call('HSET', inv, 'c:' .. slot, capacity)
      corrections = corrections + 1
    end
    live[slot] = 0
  end
  local at = 4 + 2 * n
  local a = tonumber(argv[at])
  for i = at + 1, at + 3 * a, 3 do
    local ref, slot, hold_id = argv[i], argv[i + 1], argv[i + 2]
    local rec = hold_id ~= '' and redis.call('HGET', hold, hold_id)
    local at_work = rec and split_hold(rec).state == 'c'
    if not at_work and redis.call('HSET', booked, ref, slot) == 1 then
      redis.call('HINCRBY', inv, 'b:' .. slot, 1)
      corrections = corrections + 1
    end
  end
  for i = at + 3 * a + 1, #argv do
    local slot = redis.call('HGET', booked, argv[i])
    if slot then
      redis.call('HDEL', booked, argv[i])
      redis.call('HINCRBY', inv, 'b:' .. slot, -1)
      corrections = corrections + 1
    end
  end
  if redis.call('HLEN', hold) > recount then
    return { 'reconciled', corrections, stale and 1 or 0 }
  end
  local records = redis.call('HVALS', hold)
  local per_client = {}
  for _, rec in ipairs(records) do
    local h = split_hold(rec)
    live[h.slot] = (live[h.slot] or 0) + 1
    per_client[h.client] = (per_client[h.client] or 0) + 1
  end
  local known = redis.call('HKEYS', clients)
  for _, client in ipairs(known) do
    if not per_client[client] then
      redis.call('HDEL', clients, client)
      corrections = corrections + 1
    end
  end
  for client, count in pairs(per_client) do
    if tonumber(redis.call('HGET', clients, client) or '0') ~= count then
      redis.call('HSET', clients, client, count)
      corrections = corrections + 1
    end
  end
  for slot, count in pairs(live) do
    local current = tonumber(redis.call('HGET', inv, 'h:' .. slot) or '0')
    if current ~= count then
      redis.call('HSET', inv, 'h:' .. slot, count)
      corrections = corrections + 1
    end
  end
  return { 'reconciled', corrections, stale and 1 or 0 }
end
