-- Shared helpers, prepended to every operation when the library is loaded as Redis Functions.
--
-- All keys of one release share the hash tag {r:<release>} (see engine/keys.py):
--   inv        hash  c:<slot> capacity, b:<slot> bookings Redis knows of,
--                    h:<slot> live holds (held or confirming), ready = 1 once built
--   holds      zset  hold id -> deadline (ms since epoch); only holds in state "held"
--   confirming zset  hold id -> time its confirm began (ms)
--   hold       hash  hold id -> "slot|state|deadline_ms|idem_field|token_hash", state h or c
--   idem       hash  idempotency field -> hold id
--   booked     hash  booking reference -> slot: the confirmed bookings Redis counts
--   spent      zset  challenge id -> its expiry (ms); spent challenges
-- Free places of a slot = c - b - h. Times come from the caller (ARGV), in milliseconds.

local function split_hold(rec)
  local slot, state, deadline, idem, token = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return { slot = slot, state = state, deadline = tonumber(deadline), idem = idem, token = token }
end

local function join_hold(h)
  return table.concat({ h.slot, h.state, tostring(h.deadline), h.idem, h.token }, '|')
end

-- Forget a hold entirely and give its place back.
local function drop_hold(inv, holds, confirming, hold, idem, hold_id, h)
  redis.call('HDEL', hold, hold_id)
  redis.call('ZREM', holds, hold_id)
  redis.call('ZREM', confirming, hold_id)
  if h.idem ~= '' then
    redis.call('HDEL', idem, h.idem)
  end
  redis.call('HINCRBY', inv, 'h:' .. h.slot, -1)
end

-- Reclaim at most `limit` holds whose deadline is at or before `now`. Returns how many.
local function reclaim(inv, holds, confirming, hold, idem, now, limit)
  local expired = redis.call('ZRANGE', holds, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  for _, hold_id in ipairs(expired) do
    local rec = redis.call('HGET', hold, hold_id)
    if rec then
      drop_hold(inv, holds, confirming, hold, idem, hold_id, split_hold(rec))
    else
      redis.call('ZREM', holds, hold_id)
    end
  end
  return #expired
end
