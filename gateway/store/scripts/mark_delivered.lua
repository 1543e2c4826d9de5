--[[
  Mark an order delivered once the seckill endpoint has it. A rejected order stays
  rejected.

  Input:
    KEYS[1] order record           (hash: status, ...)
    KEYS[2] idempotency record of the purchase (may have expired)

  Output:
    1   marked delivered
    0   already delivered or rejected
    -1  no such order
]]
local rcall = redis.call

local status = rcall("HGET", KEYS[1], "status")
if not status then
  return -1
end
if status ~= "admitted" then
  return 0
end
rcall("HSET", KEYS[1], "status", "delivered")
if rcall("EXISTS", KEYS[2]) == 1 then
  rcall("HSET", KEYS[2], "order_status", "delivered")
end
return 1
