--[[
  Step 1 of moving units between shards: the donor gives up a unit range.

  Takes up to ARGV[3] units from the tail of the donor's free ranges and writes a
  transfer record, so that the units are never lost: until step 2 has run they are
  counted "in transfer". A sweep finishes records left behind by a crash.

  Safe to run twice: a transfer id seen before (pending, or finished by step 3) answers
  what its first run took and takes nothing more. (redis-py resends a call whose reply
  was late; a second take would leave units in no list at all.)

  Input:
    KEYS[1] donor shard stock          (hash: remaining, version, generation, ...)
    KEYS[2] donor shard free units     (list of "lo-hi" ranges)
    KEYS[3] donor pending transfers    (hash: transfer id -> "receiver|ranges|count|ms")
    KEYS[4] donor finished transfers   (hash: transfer id -> the same record)

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

--- @include "take_units"

local shard = rcall("HMGET", KEYS[1], "remaining", "generation")
if not shard[1] or (ARGV[5] ~= "" and shard[2] ~= ARGV[5]) then
  return {-1}
end

local seen = rcall("HGET", KEYS[3], ARGV[1]) or rcall("HGET", KEYS[4], ARGV[1])
if seen then
  local ranges, count = string.match(seen, "^[^|]*|([^|]*)|([^|]*)|")
  return {tonumber(count), ranges}
end

local want = math.min(tonumber(ARGV[3]), tonumber(shard[1]))
if want <= 0 then
  return {0, ""}
end

local ranges = {}
for _, range in ipairs(takeUnits(KEYS[2], want, true)) do
  ranges[#ranges + 1] = range[1] .. "-" .. range[2]
end
local moved = table.concat(ranges, ",")
rcall("HINCRBY", KEYS[1], "remaining", -want)
rcall("HINCRBY", KEYS[1], "version", 1)
rcall("HSET", KEYS[3], ARGV[1], ARGV[2] .. "|" .. moved .. "|" .. want .. "|" .. ARGV[4])
return {want, moved}
