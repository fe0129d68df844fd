-- Atomic admission of one request against every rate limit and budget of its key and tenant
-- (SPEC §5, §6). Nothing is charged unless every check passes, so a request refused by one
-- check consumes nothing from the others.
--
-- KEYS: first 5 per rate scope (requests this minute, requests last minute, tokens this minute,
--       tokens last minute, concurrency lease set: member -> lease expiry ms), then 2 per budget
--       scope (usage hash, reservation set: member -> lease expiry ms). Key scope first.
-- ARGV:  1 now ms            2 ms elapsed in this minute         3 prompt bound (tokens)
--        4 requested output cap (-1: none)   5 output reserved against TPM when nothing caps it
--        6 smallest output worth admitting   7 lease member     8 lease expiry ms
--        9 day stamp YYYYMMDD   10 month stamp YYYYMM   11 budget mode (1 reserve, 0 post)
--        12 number of rate scopes, then 3 per rate scope (rpm, tpm, concurrency; -1 none),
--        then 3 per budget scope (daily, monthly, total; -1 none)
-- Usage hash fields: ds/d (day stamp, tokens), ms/m (month), t (total), rsum (tokens reserved by
-- requests in flight), r:<member> (one reservation), seeding (re-seed in progress since ms),
-- late:<event id> (usage settled while seeding: "tokens:day:month").
-- Replies:
--   {0, output cap (-1: none), requests used, tokens used, ... per rate scope}   admitted
--   {1, rate scope, kind (1 requests, 2 tokens, 3 concurrency), current, previous}
--   {2, budget scope}                        counters lost: re-seed from Postgres first
--   {3, budget scope, period (1 day, 2 month, 3 total), used, limit}   budget spent
--   {4, budget scope, period}                 room held by reservations of requests in flight
-- A function of limits.lua: KEYS and ARGV are the admission's part of the call.
local function admit(KEYS, ARGV)
  local frac = tonumber(ARGV[2]) / 60000
  local bound = tonumber(ARGV[3])
  local cap = tonumber(ARGV[4])
  local minimal = tonumber(ARGV[6])
  local member = ARGV[7]
  local day, month = ARGV[9], ARGV[10]
  local reserve = ARGV[11] == '1'
  local rates = tonumber(ARGV[12])
  local budgets = (#KEYS - rates * 5) / 2
  local budget_args = 13 + rates * 3
  local KEEP_USAGE_MS = 40 * 86400000

  local function count(v)
    return tonumber(v or '0')
  end

  -- Budgets first: the tightest one decides the output cap, and so the reservation. One HMGET per
  -- budget scope reads everything the checks need (each redis.call costs Redis a few µs).
  local in_flight_before = {}
  for j = 0, budgets - 1 do
    local h, z = KEYS[rates * 5 + j * 2 + 1], KEYS[rates * 5 + j * 2 + 2]
    local f = redis.call('HMGET', h, 'seeding', 'ds', 'ms', 'd', 'm', 't', 'rsum')
    if f[1] then
      return {2, j}
    end
    -- A seeded hash always has `ds`: without it the counters are gone.
    if not f[2] then
      redis.call('HSET', h, 'seeding', ARGV[1])
      return {2, j}
    end
    local in_flight = count(f[7])
    -- Reservations of an instance that stopped renewing them (it crashed) lapse.
    local lapsed = redis.call('ZRANGEBYSCORE', z, '-inf', ARGV[1])
    if #lapsed > 0 then
      for _, m in ipairs(lapsed) do
        local amount = redis.call('HGET', h, 'r:' .. m)
        if amount then
          in_flight = in_flight - tonumber(amount)
          redis.call('HDEL', h, 'r:' .. m)
        end
        redis.call('ZREM', z, m)
      end
      redis.call('HSET', h, 'rsum', in_flight)
    end
    local used = {count(f[4]), count(f[5]), count(f[6])}
    -- Periods only roll forward: an instance whose clock lags cannot reset a newer day. The
    -- hash's expiry is renewed with the day, not on every request.
    if tonumber(f[2]) < tonumber(day) then
      redis.call('HSET', h, 'ds', day, 'd', 0)
      redis.call('PEXPIRE', h, KEEP_USAGE_MS)
      used[1] = 0
    end
    if count(f[3]) < tonumber(month) then
      redis.call('HSET', h, 'ms', month, 'm', 0)
      used[2] = 0
    end
    in_flight_before[j] = in_flight
    if not reserve then
      in_flight = 0
    end
    for p = 1, 3 do
      local limit = tonumber(ARGV[budget_args + j * 3 + p - 1])
      if limit >= 0 then
        local left = limit - used[p] - in_flight
        if reserve then
          local room = left - bound
          if room < minimal then
            if limit - used[p] - bound >= minimal then
              -- Only reservations of requests in flight are in the way: retry in a moment.
              return {4, j, p}
            end
            return {3, j, p, used[p] + in_flight, limit}
          end
          if cap < 0 or room < cap then
            cap = room
          end
        elseif left <= 0 then
          return {3, j, p, used[p], limit}
        end
      end
    end
  end

  local output = cap
  if output < 0 then
    output = tonumber(ARGV[5])
  end
  local reservation = bound + output

  local used = {}
  local active = {}
  for i = 0, rates - 1 do
    local k = i * 5
    local a = 13 + i * 3
    local rpm, tpm, conc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    if conc >= 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', ARGV[1])
      active[i] = redis.call('ZCARD', KEYS[k + 5])
      if active[i] + 1 > conc then
        return {1, i, 3, active[i], 0}
      end
    end
    local w = redis.call('MGET', KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4])
    local rc, rp, tc, tp = count(w[1]), count(w[2]), count(w[3]), count(w[4])
    local r_est = rp * (1 - frac) + rc
    if rpm >= 0 and r_est + 1 > rpm then
      return {1, i, 1, rc, rp}
    end
    local t_est = tp * (1 - frac) + tc
    if tpm >= 0 and t_est + reservation > tpm then
      return {1, i, 2, tc, tp}
    end
    used[#used + 1] = math.ceil(r_est + 1)
    used[#used + 1] = math.ceil(t_est + reservation)
  end

  -- Counters get their expiry when they are created, sets when they were empty (the lease
  -- renewer extends the sets of requests in flight).
  for i = 0, rates - 1 do
    local k = i * 5
    local conc = tonumber(ARGV[15 + i * 3])
    if redis.call('INCR', KEYS[k + 1]) == 1 then
      redis.call('PEXPIRE', KEYS[k + 1], 120000)
    end
    if reservation > 0 and redis.call('INCRBY', KEYS[k + 3], reservation) == reservation then
      redis.call('PEXPIRE', KEYS[k + 3], 120000)
    end
    if conc >= 0 then
      redis.call('ZADD', KEYS[k + 5], ARGV[8], member)
      if active[i] == 0 then
        redis.call('PEXPIRE', KEYS[k + 5], 600000)
      end
    end
  end

  if reserve then
    for j = 0, budgets - 1 do
      local h, z = KEYS[rates * 5 + j * 2 + 1], KEYS[rates * 5 + j * 2 + 2]
      redis.call('HSET', h, 'r:' .. member, reservation, 'rsum', in_flight_before[j] + reservation)
      redis.call('ZADD', z, ARGV[8], member)
      if in_flight_before[j] == 0 then
        redis.call('PEXPIRE', z, 600000)
      end
    end
  end

  local out = {0, cap}
  for _, v in ipairs(used) do
    out[#out + 1] = v
  end
  return out
end
