-- The one script of the limiter: settles the settlements this instance has queued, then admits
-- one request when the call carries an admission. Settlements ride on the next admission's
-- round trip, so most requests cost Redis one call, not two.
--
-- KEYS: each settlement's keys in turn, then the admission's.
-- ARGV: 1 number of settlements S; then per settlement its key count, its argument count and
--       its arguments (settle.lua); then, when there is one, the admission's arguments
--       (admit.lua).
-- Reply: the admission's (admit.lua), {5} for settlements alone, {6} when the admission raised
-- an error (a key of the wrong type, say).
--
-- Errors are caught one settlement and one admission at a time: Redis keeps what a script wrote
-- before an error, so a failed call that had settled its settlements must still answer, or the
-- gateway would send them again.
local function part(t, from, n)
  local out = {}
  for i = 1, n do
    out[i] = t[from + i - 1]
  end
  return out
end

local function report(what, err)
  local text = type(err) == 'table' and err.err or tostring(err)
  redis.log(redis.LOG_WARNING, 'neuronetz limits: ' .. what .. ' failed: ' .. tostring(text))
end

local k, a = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local ok, err = pcall(settle, part(KEYS, k, nk), part(ARGV, a + 2, na))
  if not ok then
    report('settlement', err)
  end
  k, a = k + nk, a + 2 + na
end
if a > #ARGV then
  return {5}
end
local ok, reply = pcall(admit, part(KEYS, k, #KEYS - k + 1), part(ARGV, a, #ARGV - a + 1))
if not ok then
  report('admission', reply)
  return {6}
end
return reply
