-- issue_challenge: take a client address's token, and record one more unspent challenge,
-- unless the client already holds as many unspent challenges as it may.
-- KEYS: 1 the address's bucket (hash), 2 the address's unspent challenges (zset: id -> expiry
--       in ms), both under the address's hash tag
-- ARGV: 1 refill rate (tokens per second), 2 burst, 3 now in microseconds ('' for Redis's
--       clock), 4 challenge id, 5 its expiry (ms), 6 most unspent challenges allowed
-- Returns: {'ok', tokens left x 1000}
--          {'limited', ms until a token}          the bucket is empty; nothing recorded
--          {'stockpile', ms until one expires}    too many unspent; nothing taken or recorded
local function issue_challenge(keys, argv)
  local bucket, unspent = keys[1], keys[2]
  local now_us = clock_us(argv[3])
  local now_ms = math.floor(now_us / 1000)
  local expiry, most = tonumber(argv[5]), tonumber(argv[6])
  redis.call('ZREMRANGEBYSCORE', unspent, '-inf', now_ms)
  if redis.call('ZCARD', unspent) >= most then
    local oldest = redis.call('ZRANGE', unspent, 0, 0, 'WITHSCORES')
    return { 'stockpile', math.max(1, tonumber(oldest[2]) - now_ms) }
  end
  local result = take(bucket, tonumber(argv[1]), tonumber(argv[2]), 1, now_us)
  if not result[1] then
    return { 'limited', result[2] }
  end
  redis.call('ZADD', unspent, expiry, argv[4])
  redis.call('PEXPIREAT', unspent, expiry)
  return { 'ok', math.floor(result[2] * 1000) }
end
