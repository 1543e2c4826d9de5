--[[
  Create one shard of a sale. Safe to run twice: a shard of this generation that exists
  is left as it is; a shard of another generation (another creation of the SKU) is not
  touched, and the caller learns that the SKU is no longer its to create; neither is a
  shard of a generation closed before (a creator that outlived its sale's deletion must
  not bring it back).

  Input:
    KEYS[1] shard stock       (hash: remaining, sold, limit, price, shards, version,
                               generation, starts_at, ends_at, payment_ttl)
    KEYS[2] shard free units  (list of "lo-hi" ranges)
    KEYS[3] shard's closed generation (string, expires; see close_shard.lua)

    ARGV[1] first unit number of the shard's range
    ARGV[2] last unit number of the shard's range (ARGV[2] < ARGV[1]: no units)
    ARGV[3] per-user limit
    ARGV[4] price, minor units
    ARGV[5] shard count of the sale
    ARGV[6] generation of the sale (a new one for every creation of a SKU)
    ARGV[7] starts_at, epoch ms (0: none)
    ARGV[8] ends_at, epoch ms (0: none)
    ARGV[9] payment_ttl, seconds (0: none)

  Output:
    1   created
    0   existed already (this generation)
    -1  a shard of another generation is there
    -2  this generation's shard was closed (its sale deleted or undone)
]]
local rcall = redis.call

if rcall("GET", KEYS[3]) == ARGV[6] then
  return -2
end

local generation = rcall("HGET", KEYS[1], "generation")
if generation then
  if generation == ARGV[6] then
    return 0
  end
  return -1
end
local lo = tonumber(ARGV[1])
local hi = tonumber(ARGV[2])
local count = 0
rcall("DEL", KEYS[2])
if hi >= lo then
  count = hi - lo + 1
  rcall("RPUSH", KEYS[2], lo .. "-" .. hi)
end
rcall("HSET", KEYS[1], "remaining", count, "sold", 0, "limit", ARGV[3],
      "price", ARGV[4], "shards", ARGV[5], "version", 0, "generation", ARGV[6],
      "starts_at", ARGV[7], "ends_at", ARGV[8], "payment_ttl", ARGV[9])
return 1
