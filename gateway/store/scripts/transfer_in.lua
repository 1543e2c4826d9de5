--[[
  Step 2 of moving units between shards: the receiver adds the range.

  Keyed by the transfer id, so a repeat (a retry, or the sweep finishing a transfer
  that its mover finished too) adds nothing.

  Input:
    KEYS[1] receiver shard stock       (hash: remaining, version, generation, ...)
    KEYS[2] receiver shard free units  (list of "lo-hi" ranges)
    KEYS[3] receiver applied transfers (set of transfer ids)

    ARGV[1] transfer id
    ARGV[2] ranges, "lo-hi,lo-hi,..."
    ARGV[3] unit count in the ranges
    ARGV[4] generation of the sale the units came from ("" : any)

  Output:
    1   added
    0   already added before
    -1  no such shard (sale deleted, or created anew: the units belong to no sale now)
]]
local rcall = redis.call

local gen = rcall("HGET", KEYS[1], "generation")
if not gen or (ARGV[4] ~= "" and gen ~= ARGV[4]) then
  return -1
end
if rcall("SADD", KEYS[3], ARGV[1]) == 0 then
  return 0
end
for range in string.gmatch(ARGV[2], "[^,]+") do
  rcall("RPUSH", KEYS[2], range)
end
rcall("HINCRBY", KEYS[1], "remaining", tonumber(ARGV[3]))
rcall("HINCRBY", KEYS[1], "version", 1)
return 1
