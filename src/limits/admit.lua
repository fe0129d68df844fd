-- Atomic admission for one request against every limit of its key and tenant (SPEC §5).
-- Nothing is charged unless every check passes, so a request refused by one limit consumes
-- nothing from the others.
--
-- KEYS, 5 per scope (key first, then tenant):
--   requests this minute, requests last minute, tokens this minute, tokens last minute,
--   concurrency lease set (ZSET member -> lease expiry in ms)
-- ARGV: now_ms, fraction of the current minute elapsed, token reservation, lease member,
--       lease expiry ms, then per scope: rpm limit, tpm limit, concurrency limit (-1 = none)
-- Returns {0, rpm_used_est, tpm_used_est, ... per scope} when admitted (estimates after the
-- charge), or {1, scope index, kind (1 requests, 2 tokens, 3 concurrency), current, previous}.
local now = tonumber(ARGV[1])
local frac = tonumber(ARGV[2])
local reservation = tonumber(ARGV[3])
local member = ARGV[4]
local lease_until = tonumber(ARGV[5])
local scopes = #KEYS / 5

local function num(key)
  return tonumber(redis.call('GET', key) or '0')
end

local used = {}
for i = 0, scopes - 1 do
  local k = i * 5
  local a = 6 + i * 3
  local rpm, tpm, conc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    local active = redis.call('ZCARD', KEYS[k + 5])
    if active + 1 > conc then
      return {1, i, 3, active, 0}
    end
  end
  local rc, rp = num(KEYS[k + 1]), num(KEYS[k + 2])
  local r_est = rp * (1 - frac) + rc
  if rpm >= 0 and r_est + 1 > rpm then
    return {1, i, 1, rc, rp}
  end
  local tc, tp = num(KEYS[k + 3]), num(KEYS[k + 4])
  local t_est = tp * (1 - frac) + tc
  if tpm >= 0 and t_est + reservation > tpm then
    return {1, i, 2, tc, tp}
  end
  used[#used + 1] = math.ceil(r_est + 1)
  used[#used + 1] = math.ceil(t_est + reservation)
end

for i = 0, scopes - 1 do
  local k = i * 5
  local conc = tonumber(ARGV[8 + i * 3])
  redis.call('INCR', KEYS[k + 1])
  redis.call('PEXPIRE', KEYS[k + 1], 120000)
  if reservation > 0 then
    redis.call('INCRBY', KEYS[k + 3], reservation)
    redis.call('PEXPIRE', KEYS[k + 3], 120000)
  end
  if conc >= 0 then
    redis.call('ZADD', KEYS[k + 5], lease_until, member)
    redis.call('PEXPIRE', KEYS[k + 5], 600000)
  end
end

local out = {0}
for _, v in ipairs(used) do
  out[#out + 1] = v
end
return out
