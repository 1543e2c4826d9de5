--[[
  Create one shard of a sale (idempotent: an existing shard is left as it is).

  Input:
    KEYS[1] shard stock       (hash: remaining, sold, limit, price, shards, version, generation)
    KEYS[2] shard free units  (list of "lo-hi" ranges)

    ARGV[1] first unit number of the shard's range
    ARGV[2] last unit number of the shard's range (ARGV[2] < ARGV[1]: no units)
    ARGV[3] per-user limit
    ARGV[4] price, minor units
    ARGV[5] shard count of the sale
    ARGV[6] generation of the sale (a new one for every creation of a SKU)

  Output:
    1  created
    0  the shard existed already
]]
local rcall = redis.call

if rcall("EXISTS", KEYS[1]) == 1 then
  return 0
end
local lo = tonumber(ARGV[1])
local hi = tonumber(ARGV[2])
local count = 0
if hi >= lo then
  count = hi - lo + 1
  rcall("RPUSH", KEYS[2], lo .. "-" .. hi)
end
rcall("HSET", KEYS[1], "remaining", count, "sold", 0, "limit", ARGV[3],
      "price", ARGV[4], "shards", ARGV[5], "version", 0,
      "generation", ARGV[6])
return 1
