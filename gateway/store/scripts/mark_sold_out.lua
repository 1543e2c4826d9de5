--[[
  Record that a sale is sold out, unless units came back since the caller looked.

  The caller read the sale's `returns` counter, then found every shard empty with two
  identical reads. Units given back (a refused, expired or cancelled order) increment
  `returns` after they are back in their shard; so if the counter still has the value
  read before the shards were, no unit came back in between and the sale is truly
  empty. The flag is the counter value it was set under: any later return makes it
  stale at once, with no delete to race against. Safe to run twice.

  Input:
    KEYS[1] the sale's sold-out state (hash: returns, sold_out_at, generation)

    ARGV[1] `returns` as the caller read it before its consistent read ("" : absent)
    ARGV[2] generation of the sale

  Output:
    1  recorded
    0  units came back meanwhile: not recorded
]]
local rcall = redis.call

local returns = rcall("HGET", KEYS[1], "returns") or ""
if returns ~= ARGV[1] then
  return 0
end
rcall("HSET", KEYS[1], "sold_out_at", ARGV[1], "generation", ARGV[2])
return 1
