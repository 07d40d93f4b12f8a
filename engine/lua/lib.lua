-- Shared helpers, prepended to every operation when the library is loaded as Redis Functions.
--
-- All keys of one release share the hash tag {r:<release>} (see engine/keys.py):
--   inv        hash  c:<slot> capacity, b:<slot> bookings Redis knows of,
--                    h:<slot> live holds (held or confirming), ready = 1 once built
--   clients    hash  client -> its live holds in this release (absent when 0); kept out of
--                    inv so that reading the inventory does not grow with live holds
--   holds      zset  hold id -> deadline (ms since epoch); only holds in state "held"
--   confirming zset  hold id -> time its confirm began (ms)
--   confirms   hash  hold id -> confirms of it under way besides one (absent for one): a
--                    second submission of a hold begun before the first ended
--   hold       hash  hold id -> "slot|state|deadline_ms|idem_field|token_hash|client",
--                    state h (held) or c (confirming), client an opaque tag of the client
--   idem       hash  idempotency field -> hold id
--   booked     hash  booking reference -> slot: the confirmed bookings Redis counts
--   spent      zset  challenge id -> its expiry (ms); spent challenges
--   fence      string  a random integer, new at each capacity change lower_capacity or
--                    withdraw makes (or finds the inventory missing for): a write of capacities from a
--                    PostgreSQL snapshot read before one sets none (docs/consistency.md,
--                    section 8). Kept when the inventory is lost; if Redis loses it too,
--                    every write in flight is refused, as none can carry a value again
-- Free places of a slot = c - b - h. Times come from the caller (ARGV), in milliseconds.

-- How long a spent challenge is kept past its expiry. Each worker judges expiry by its own
-- clock: one whose clock runs ahead trimmed a challenge from the spent set while a worker
-- whose clock is right still took it as unexpired, and spent it again.
local SPENT_KEPT_MS = 10000

local function split_hold(rec)
  local slot, state, deadline, idem, token, client =
    string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return { slot = slot, state = state, deadline = tonumber(deadline), idem = idem, token = token,
           client = client }
end

local function join_hold(h)
  return table.concat({ h.slot, h.state, tostring(h.deadline), h.idem, h.token, h.client }, '|')
end

-- One client's live holds in this release (the field is absent when 0).
local function client_holds(clients, client, delta)
  local n = redis.call('HINCRBY', clients, client, delta)
  if n <= 0 then
    redis.call('HDEL', clients, client)
    return 0
  end
  return n
end

-- A token bucket at `now_us` (microseconds): take `cost` tokens if there are that many; a
-- negative `cost` gives tokens back, the bucket at most full.
-- Returns {true, tokens left} or {false, milliseconds until there would be enough}.
local function take(bucket, rate, burst, cost, now_us)
  local state = redis.call('HMGET', bucket, 'tokens', 'ts_us')
  local tokens, ts = tonumber(state[1]), tonumber(state[2])
  if not tokens then
    tokens, ts = burst, now_us
  end
  tokens = math.min(burst, tokens + math.max(0, now_us - ts) * rate / 1000000)
  local ok = tokens >= cost
  if ok then
    tokens = math.min(burst, tokens - cost)
  end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ts_us', now_us)
  redis.call('PEXPIRE', bucket, math.ceil(burst / rate * 1000) + 1000)
  if ok then
    return { true, tokens }
  end
  return { false, math.ceil((cost - tokens) / rate * 1000) }
end

-- Redis's own clock in microseconds, unless the caller gives one (tests inject time).
local function clock_us(override)
  if override ~= nil and override ~= '' then
    return tonumber(override)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Forget a hold entirely and give its place back.
local function drop_hold(inv, holds, confirming, hold, idem, clients, hold_id, h)
  redis.call('HDEL', hold, hold_id)
  redis.call('ZREM', holds, hold_id)
  redis.call('ZREM', confirming, hold_id)
  if h.idem ~= '' then
    redis.call('HDEL', idem, h.idem)
  end
  redis.call('HINCRBY', inv, 'h:' .. h.slot, -1)
  client_holds(clients, h.client, -1)
end

-- Reclaim at most `limit` holds whose deadline is at or before `now`. Returns how many.
local function reclaim(inv, holds, confirming, hold, idem, clients, now, limit)
  local expired = redis.call('ZRANGE', holds, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  for _, hold_id in ipairs(expired) do
    local rec = redis.call('HGET', hold, hold_id)
    if rec then
      drop_hold(inv, holds, confirming, hold, idem, clients, hold_id, split_hold(rec))
    else
      redis.call('ZREM', holds, hold_id)
    end
  end
  return #expired
end
