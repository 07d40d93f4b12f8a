-- hold: spend a challenge and take one place on a slot, atomically.
-- KEYS: 1 inv, 2 holds, 3 confirming, 4 hold, 5 idem, 6 spent, 7 clients (see lib.lua)
-- ARGV: 1 now_ms, 2 slot id, 3 new hold id, 4 token hash (hex), 5 deadline_ms,
--       6 idempotency field ('' for none), 7 challenge id, 8 challenge expiry_ms,
--       9 reclaim limit (expired holds reclaimed first), 10 client tag,
--       11 most live holds one client may have in this release
-- Returns: {'granted', hold_id, deadline_ms, token_hash}
--          {'replayed', hold_id, deadline_ms, token_hash}  same idempotency field: the live
--                         (or confirming) hold; the challenge brought is spent
--          {'full'}       no free place; the challenge is spent
--          {'spent'}      the challenge was spent before, or has expired; nothing changed
--          {'no-slot'}    the slot is not in this release's inventory; nothing changed
--          {'client-limit'}  the client has as many live holds as it may; nothing changed
--          {'reclaiming'} the slot looks full, or the client at its limit, but more holds
--                         have expired than one call reclaims, and theirs may be among
--                         them; nothing changed
--          {'rebuild'}    the inventory is missing; rebuild it from PostgreSQL and retry
local function hold(keys, argv)
  local inv, holds, confirming, hold, idem, spent, clients = unpack(keys)
  local now, slot, hold_id, token = tonumber(argv[1]), argv[2], argv[3], argv[4]
  local deadline, idem_field = tonumber(argv[5]), argv[6]
  local challenge, challenge_expiry, limit = argv[7], tonumber(argv[8]), tonumber(argv[9])
  local client, most_holds = argv[10], tonumber(argv[11])

  if redis.call('EXISTS', inv) == 0 then
    return { 'rebuild' }
  end
  local reclaimed = reclaim(inv, holds, confirming, hold, idem, clients, now, limit)
  if idem_field ~= '' then
    local previous = redis.call('HGET', idem, idem_field)
    if previous then
      local rec = redis.call('HGET', hold, previous)
      if rec then
        local h = split_hold(rec)
        if h.state ~= 'h' or h.deadline > now then
          -- The challenge it brings is spent with it (the hold's own already is): this
          -- round trip takes it off the address's unspent ones, and it must not stay
          -- usable uncounted, past the cap.
          if challenge_expiry > now then
            redis.call('ZADD', spent, challenge_expiry, challenge)
          end
          return { 'replayed', previous, h.deadline, h.token }
        end
        -- Expired, and not reclaimed yet (more expired ahead of it than one call takes):
        -- gone, as if it had been, not answered as a hold whose time is over.
        drop_hold(inv, holds, confirming, hold, idem, clients, previous, h)
      end
      redis.call('HDEL', idem, idem_field)
    end
  end
  -- An expired challenge counts as spent: the spent set forgets it a while after it has
  -- expired (SPENT_KEPT_MS, lib.lua).
  if challenge_expiry <= now or redis.call('ZSCORE', spent, challenge) then
    return { 'spent' }
  end
  local capacity = redis.call('HGET', inv, 'c:' .. slot)
  if not capacity then
    return { 'no-slot' }
  end
  -- A rush's holds expiring together, more than one call gives back (the sweeper drains
  -- them within its pass): the client's own, or this slot's, may be among them. Refusing
  -- now ("client-limit" for ten minutes, or "full" and the challenge spent) would be for a
  -- hold or a place gone in a second.
  local function backlog()
    return reclaimed >= limit
      and #redis.call('ZRANGE', holds, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1) > 0
  end
  if tonumber(redis.call('HGET', clients, client) or '0') >= most_holds then
    return { backlog() and 'reclaiming' or 'client-limit' }
  end
  local taken = tonumber(redis.call('HGET', inv, 'b:' .. slot) or '0')
      + tonumber(redis.call('HGET', inv, 'h:' .. slot) or '0')
  if taken >= tonumber(capacity) and backlog() then
    return { 'reclaiming' }
  end
  -- The capacity decision: from here on the challenge is spent, whatever the answer.
  redis.call('ZREMRANGEBYSCORE', spent, '-inf', now - SPENT_KEPT_MS)
  redis.call('ZADD', spent, challenge_expiry, challenge)
  if taken >= tonumber(capacity) then
    return { 'full' }
  end
  redis.call('HINCRBY', inv, 'h:' .. slot, 1)
  client_holds(clients, client, 1)
  redis.call('ZADD', holds, deadline, hold_id)
  redis.call('HSET', hold, hold_id, join_hold({ slot = slot, state = 'h', deadline = deadline,
    idem = idem_field, token = token, client = client }))
  if idem_field ~= '' then
    redis.call('HSET', idem, idem_field, hold_id)
  end
  return { 'granted', hold_id, deadline, token }
end
