-- spend_challenge: spend a challenge on an attempt that is not a hold (a draw entry).
-- KEYS: 1 spent (zset: challenge id -> expiry in ms; see lib.lua)
-- ARGV: 1 now_ms, 2 challenge id, 3 challenge expiry (ms)
-- Returns: {'spent'} (it was spent before, or has expired: nothing changed) or {'ok'}
local function spend_challenge(keys, argv)
  local spent = keys[1]
  local now, challenge, expiry = tonumber(argv[1]), argv[2], tonumber(argv[3])
  if expiry <= now or redis.call('ZSCORE', spent, challenge) then
    return { 'spent' }
  end
  redis.call('ZREMRANGEBYSCORE', spent, '-inf', now - SPENT_KEPT_MS)
  redis.call('ZADD', spent, expiry, challenge)
  return { 'ok' }
end
