-- Restores a budget usage hash that Redis lost, from Postgres' durable usage.
-- KEYS: 1 the usage hash
-- ARGV: 1 the `seeding` marker this seed answers, 2 day stamp, 3 month stamp, 4 day tokens,
--       5 month tokens, 6 total tokens (from Postgres), 7... ids of `late:` events Postgres had
-- Returns 1 when seeded, 0 when someone else already did.
local h = KEYS[1]
if redis.call('HGET', h, 'seeding') ~= ARGV[1] then
  return 0
end
local applied = {}
for i = 7, #ARGV do
  applied[ARGV[i]] = true
end
local d, m, t = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local fields = redis.call('HGETALL', h)
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 1, 5) == 'late:' then
    if not applied[string.sub(f, 6)] then
      local amount, ld, lm = string.match(fields[i + 1], '^(%d+):(%d+):(%d+)$')
      amount = tonumber(amount)
      if amount then
        t = t + amount
        if ld == ARGV[2] then
          d = d + amount
        end
        if lm == ARGV[3] then
          m = m + amount
        end
      end
    end
    redis.call('HDEL', h, f)
  end
end
redis.call('HDEL', h, 'seeding')
redis.call('HSET', h, 'ds', ARGV[2], 'd', d, 'ms', ARGV[3], 'm', m, 't', t, 'rsum', 0)
redis.call('PEXPIRE', h, 40 * 86400000)
return 1
