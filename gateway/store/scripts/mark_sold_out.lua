--[[
  Record that a sale is sold out, unless units came back (or are coming back) since the
  caller looked.

  The state lives in the sale's registry record, beside its generation: a mark for a
  sale deleted meanwhile (or created anew) writes nothing. Units given back (a refused,
  expired or cancelled order) are announced before they go back (`returning:<order_no>`,
  count_return.lua) and counted after (`returns`). The caller read `returns` before it
  found every shard empty with two identical reads; if `returns` still has that value and
  no return is under way, no unit came back in between and the sale is truly empty. The
  mark is the counter value it was set under: any later return makes it stale at once,
  with no delete to race against. An announced return older than ARGV[4] ms is taken to
  be from a process that died half-way (its units, if any went back, were in the shards
  the caller read). Safe to run twice.

  Input:
    KEYS[1] the sale's registry record (hash: generation, state, returns, sold_out_at,
            returning:<order_no> -> epoch ms, ...)

    ARGV[1] `returns` as the caller read it before its consistent read ("" : absent)
    ARGV[2] generation of the sale
    ARGV[3] now, epoch ms
    ARGV[4] age in ms past which an announced return is ignored

  Output:
    1  recorded
    0  not recorded: units came back or are coming back, or the sale is not this one
]]
local rcall = redis.call

local record = rcall("HGETALL", KEYS[1])
local fields = {}
for i = 1, #record, 2 do
  fields[record[i]] = record[i + 1]
end
if fields["generation"] ~= ARGV[2] or fields["state"] ~= "ready" then
  return 0
end
if (fields["returns"] or "") ~= ARGV[1] then
  return 0
end
local oldest = tonumber(ARGV[3]) - tonumber(ARGV[4])
for name, value in pairs(fields) do
  if string.sub(name, 1, 10) == "returning:" and tonumber(value) > oldest then
    return 0
  end
end
rcall("HSET", KEYS[1], "sold_out_at", ARGV[1])
return 1
