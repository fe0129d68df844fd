-- Settles one admitted request: corrects the token bucket that was charged by the difference
-- between actual tokens and the reservation, and releases the concurrency lease.
-- KEYS: per scope: the token bucket charged, the concurrency lease set
-- ARGV: token delta (actual - reserved; may be negative), lease member
local delta = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], delta)
    if v < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    end
  end
  redis.call('ZREM', KEYS[i + 1], ARGV[2])
end
return 1
