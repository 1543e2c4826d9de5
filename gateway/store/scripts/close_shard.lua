--[[
  Close one shard of a sale being deleted or undone: its stock record goes first, so no
  purchase can land in it afterwards (purchase.lua answers SALE_NOT_FOUND), and the
  numbers of the orders it admitted are returned, for the caller to delete their
  records. The closed generation is remembered for a while (ARGV[2] ms), so that a
  creator of that generation still at work cannot bring the shard back. Safe to run
  twice: a shard already closed returns its order index again (the index is deleted
  last, by the caller, with the orders).

  Input:
    KEYS[1] shard stock              (hash: ..., generation)
    KEYS[2] shard free units
    KEYS[3] shard buyers
    KEYS[4] shard pending transfers
    KEYS[5] shard finished transfers
    KEYS[6] shard applied transfers
    KEYS[7] shard's users with a recorded outcome
    KEYS[8] shard order index        (set of order_no)
    KEYS[9] shard's closed generation (string, expires)

    ARGV[1] generation to close ("" : whichever)
    ARGV[2] how long to remember it, ms

  Output:
    {1, order_no...}  closed (or closed before); the orders to delete
    {0}               the shard belongs to another generation: left alone
]]
local rcall = redis.call

local generation = rcall("HGET", KEYS[1], "generation")
if generation and ARGV[1] ~= "" and generation ~= ARGV[1] then
  return {0}
end
local closed = generation or ARGV[1]
if closed and closed ~= "" then
  rcall("SET", KEYS[9], closed, "PX", tonumber(ARGV[2]))
end
rcall("DEL", KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
local reply = {1}
for _, orderNo in ipairs(rcall("SMEMBERS", KEYS[8])) do
  reply[#reply + 1] = orderNo
end
return reply
