--[[
  Undo an admitted purchase that the seckill endpoint refused: its units go back to
  the shard, the buyer's count drops, the order reads "rejected" and the key's stored
  outcome says so. Safe to run twice.

  Units the endpoint reported as taken by another order (UNIT_TAKEN: a Redis failover
  lost the write that sold them, so they were issued twice) are sold already: they
  stay counted as sold and are not returned, or the next buyer would be refused too.

  Input:
    KEYS[1] order record         (hash: units, quantity, user_id, status, idempotency_key, ...)
    KEYS[2] shard stock          (hash: remaining, sold, version, ...)
    KEYS[3] shard free units     (list of "lo-hi" ranges)
    KEYS[4] shard buyers         (hash: <user_id> -> units held, <user_id>:o -> order_no)
    KEYS[5] idempotency record of the purchase (may have expired)

    ARGV[1] reason, stored on the order
    ARGV[2] units not to return, "u,u,..." (may be empty)

  Output:
    {1, returned}  compensated: `returned` units back in the shard
    {0}            nothing to undo: the order was rejected already, or delivered (an
                   endpoint that stored it and then refuses a repeat must not get its
                   units sold again)
    {-1}           no such order
]]
local rcall = redis.call

local order = rcall("HMGET", KEYS[1], "status", "units", "quantity", "user_id", "order_no")
if not order[1] then
  return {-1}
end
if order[1] ~= "admitted" then
  return {0}
end
local quantity = tonumber(order[3])

local keep = {}
for unit in string.gmatch(ARGV[2], "[^,]+") do
  keep[unit] = true
end
local returned = 0
if rcall("EXISTS", KEYS[2]) == 1 then
  for unit in string.gmatch(order[2], "[^,]+") do
    if not keep[unit] then
      rcall("RPUSH", KEYS[3], unit .. "-" .. unit)
      returned = returned + 1
    end
  end
  rcall("HINCRBY", KEYS[2], "remaining", returned)
  rcall("HINCRBY", KEYS[2], "sold", -returned)
  rcall("HINCRBY", KEYS[2], "version", 1)
end

local userId = order[4]
local held = tonumber(rcall("HGET", KEYS[4], userId) or "0") - quantity
if held > 0 then
  rcall("HSET", KEYS[4], userId, held)
else
  rcall("HDEL", KEYS[4], userId, userId .. ":o")
end

rcall("HSET", KEYS[1], "status", "rejected", "reason", ARGV[1])
if rcall("EXISTS", KEYS[5]) == 1 then
  rcall("HSET", KEYS[5], "order_status", "rejected")
end
return {1, returned}
