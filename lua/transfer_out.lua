--[[
  Step 1 of moving units between shards: the donor gives up a unit range.

  Takes up to ARGV[3] units from the tail of the donor's free ranges and writes a
  transfer record, so that the units are never lost: until step 2 has run they are
  counted "in transfer". A sweep finishes records left behind by a crash.

  Input:
    KEYS[1] donor shard stock       (hash: remaining, ver, ...)
    KEYS[2] donor shard free units  (list of "lo-hi" ranges)
    KEYS[3] donor outgoing transfers (hash: transfer id -> "receiver|ranges|count|ms")

    ARGV[1] transfer id (unique)
    ARGV[2] receiving shard number
    ARGV[3] units wanted
    ARGV[4] now, epoch milliseconds
    ARGV[5] generation of the sale the caller means ("" : any)

  Output:
    {count, ranges}  units moved out (count 0: the donor had none, nothing recorded)
    {-1}             no such shard (sale deleted, or created anew)
]]
local rcall = redis.call

local shard = rcall("HMGET", KEYS[1], "remaining", "gen")
if not shard[1] or (ARGV[5] ~= "" and shard[2] ~= ARGV[5]) then
  return {-1}
end
local remaining = tonumber(shard[1])
local want = math.min(tonumber(ARGV[3]), remaining)
if want <= 0 then
  return {0, ""}
end

local ranges = {}
local need = want
while need > 0 do
  local range = rcall("LINDEX", KEYS[2], -1)
  if not range then
    return redis.error_reply("ERR units list shorter than remaining counter")
  end
  local dash = string.find(range, "-", 1, true)
  local lo = tonumber(string.sub(range, 1, dash - 1))
  local hi = tonumber(string.sub(range, dash + 1))
  local n = math.min(need, hi - lo + 1)
  ranges[#ranges + 1] = (hi - n + 1) .. "-" .. hi
  if hi - n < lo then
    rcall("RPOP", KEYS[2])
  else
    rcall("LSET", KEYS[2], -1, lo .. "-" .. (hi - n))
  end
  need = need - n
end

local moved = table.concat(ranges, ",")
rcall("HINCRBY", KEYS[1], "remaining", -want)
rcall("HINCRBY", KEYS[1], "ver", 1)
rcall("HSET", KEYS[3], ARGV[1], ARGV[2] .. "|" .. moved .. "|" .. want .. "|" .. ARGV[4])
return {want, moved}
