-- take_token: take tokens from a token bucket, on Redis's own clock.
-- KEYS: 1 bucket (hash: tokens, ts_us; expires once it would be full again)
-- ARGV: 1 refill rate (tokens per second), 2 burst (bucket size), 3 cost (tokens; below 0
--       gives tokens back),
--       4 now in microseconds ('' for Redis's clock; tests inject time)
-- Returns: {'ok', tokens left x 1000} or {'limited', milliseconds until enough tokens}
local function take_token(keys, argv)
  local result = take(keys[1], tonumber(argv[1]), tonumber(argv[2]), tonumber(argv[3]),
    clock_us(argv[4]))
  if result[1] then
    return { 'ok', math.floor(result[2] * 1000) }
  end
  return { 'limited', result[2] }
end
