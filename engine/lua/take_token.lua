-- take_token: a token bucket on Redis's own clock.
-- KEYS: 1 bucket (hash: tokens, ts_us)
-- ARGV: 1 refill rate (tokens per second), 2 burst (bucket size), 3 cost (tokens)
-- Returns: {'ok', 0} or {'limited', retry_after_ms}
local function take_token(keys, argv)
  local bucket = keys[1]
  local rate, burst, cost = tonumber(argv[1]), tonumber(argv[2]), tonumber(argv[3])
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local state = redis.call('HMGET', bucket, 'tokens', 'ts_us')
  local tokens, ts = tonumber(state[1]), tonumber(state[2])
  if not tokens then
    tokens, ts = burst, now_us
  end
  tokens = math.min(burst, tokens + (now_us - ts) * rate / 1000000)
  local ttl_ms = math.ceil(burst / rate * 1000)
  if tokens < cost then
    redis.call('HSET', bucket, 'tokens', tokens, 'ts_us', now_us)
    redis.call('PEXPIRE', bucket, ttl_ms)
    return { 'limited', math.ceil((cost - tokens) / rate * 1000) }
  end
  redis.call('HSET', bucket, 'tokens', tokens - cost, 'ts_us', now_us)
  redis.call('PEXPIRE', bucket, ttl_ms)
  return { 'ok', 0 }
end
