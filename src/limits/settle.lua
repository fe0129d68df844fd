-- Settles one admitted request with its actual token count.
-- KEYS: 2 per rate scope (the token bucket charged, the concurrency lease set), then 2 per budget
--       scope (usage hash, reservation set); see admit.lua.
-- ARGV: 1 token delta for the rate buckets (actual - reserved; may be negative), 2 lease member,
--       3 number of rate scopes, 4 actual tokens, 5 day stamp and 6 month stamp of the admission,
--       7 event id (names usage settled while counters are being re-seeded), 8 now ms
-- A function of limits.lua: KEYS and ARGV are this settlement's part of the call.
local function settle(KEYS, ARGV)
  local delta = tonumber(ARGV[1])
  local member = ARGV[2]
  local rates = tonumber(ARGV[3])
  local actual = tonumber(ARGV[4])
  local day, month = ARGV[5], ARGV[6]

  for i = 1, rates * 2, 2 do
    if delta ~= 0 then
      local v = redis.call('INCRBY', KEYS[i], delta)
      -- The bucket had expired (its minute is past every window) or held 0: it must not stay
      -- without an expiry.
      if v == delta then
        redis.call('PEXPIRE', KEYS[i], 120000)
      end
      if v < 0 then
        redis.call('SET', KEYS[i], 0, 'KEEPTTL')
      end
    end
    redis.call('ZREM', KEYS[i + 1], member)
  end

  for i = rates * 2 + 1, #KEYS, 2 do
    local h, z = KEYS[i], KEYS[i + 1]
    redis.call('ZREM', z, member)
    local f = redis.call('HMGET', h, 'seeding', 'ds', 'ms', 'r:' .. member, 'd', 'm', 't', 'rsum')
    -- Counters lost (Redis restarted) or being re-seeded: mark them and keep this usage as late,
    -- so the seed counts it whether or not Postgres has it yet.
    if f[1] or not f[2] then
      if not f[1] then
        redis.call('HSET', h, 'seeding', ARGV[8])
      end
      redis.call('HSET', h, 'late:' .. ARGV[7], actual .. ':' .. day .. ':' .. month)
    else
      -- One HSET writes every new count (the script is atomic, so reading then writing is as
      -- safe as HINCRBY); integers are written as digits, never in exponent form.
      local set = {}
      local function put(field, value)
        set[#set + 1] = field
        set[#set + 1] = string.format('%d', value)
      end
      if f[4] then
        redis.call('HDEL', h, 'r:' .. member)
        put('rsum', tonumber(f[8] or '0') - tonumber(f[4]))
      end
      if actual > 0 then
        if f[2] == day then
          put('d', tonumber(f[5] or '0') + actual)
        end
        if f[3] == month then
          put('m', tonumber(f[6] or '0') + actual)
        end
        put('t', tonumber(f[7] or '0') + actual)
      end
      if #set > 0 then
        redis.call('HSET', h, unpack(set))
      end
    end
  end
  return 1
end
