-- unlock: release a lock taken with SET NX PX (Inventory.try_lock) if `token` still owns it.
-- Once the lock expired another worker may have taken it: its lock stays.
-- KEYS: 1 the lock
-- ARGV: 1 the owner's token
-- Returns: {1} if released, {0} if the lock was another's or gone
local function unlock(keys, argv)
  if redis.call('GET', keys[1]) == argv[1] then
    return { redis.call('DEL', keys[1]) }
  end
  return { 0 }
end
