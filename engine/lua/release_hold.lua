-- release_hold: the applicant gives a hold back; its place is free at once.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 clients (see lib.lua)
-- ARGV: 1 hold id, 2 now_ms
-- Returns: {'released'}, {'confirming'} (a confirm is under way: nothing changed),
--          or {'gone'} (no such live hold)
local function release_hold(keys, argv)
  local inv, holds, confirming, hold, idem, clients = unpack(keys)
  local hold_id, now = argv[1], tonumber(argv[2])
  local rec = redis.call('HGET', hold, hold_id)
  if not rec then
    return { 'gone' }
  end
  local h = split_hold(rec)
  if h.state == 'c' then
    return { 'confirming' }
  end
  drop_hold(inv, holds, confirming, hold, idem, clients, hold_id, h)
  if h.deadline <= now then
    return { 'gone' }
  end
  return { 'released' }
end
