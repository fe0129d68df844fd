-- The one script of the limiter: settles the settlements this instance has queued, then admits
-- one request when the call carries an admission. Settlements ride on the next admission's
-- round trip, so most requests cost Redis one call, not two.
--
-- KEYS: each settlement's keys in turn, then the admission's.
-- ARGV: 1 number of settlements S; then per settlement its key count, its argument count and
--       its arguments (settle.lua); then, when there is one, the admission's arguments
--       (admit.lua).
-- Reply: the admission's (admit.lua), or {5} for settlements alone.
local function part(t, from, n)
  local out = {}
  for i = 1, n do
    out[i] = t[from + i - 1]
  end
  return out
end

local k, a = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  settle(part(KEYS, k, nk), part(ARGV, a + 2, na))
  k, a = k + nk, a + 2 + na
end
if a > #ARGV then
  return {5}
end
return admit(part(KEYS, k, #KEYS - k + 1), part(ARGV, a, #ARGV - a + 1))
