--[[
  Give an admitted purchase's units back to its sale: the endpoint refused the order
  ("rejected"), or it was left unpaid past its deadline or cancelled ("released"). The
  units go back to the purchase's shard, the buyer's count drops, the order and the
  key's stored outcome say what happened. Safe to run twice: the second run moves
  nothing and answers the order's status.

  A rejection applies to an order not yet delivered; a release also to a delivered one
  (the endpoint holds it, unpaid). Units the endpoint reported as taken by another order
  (UNIT_TAKEN: a Redis failover lost the write that sold them, so they were issued
  twice) are sold already: they stay counted as sold, or the next buyer would be
  refused too. An order of an earlier sale of the same SKU (deleted, created again)
  gives nothing back: its units belong to no sale now.

  Input:
    KEYS[1] order record         (hash: units, quantity, user_id, status, generation, ...)
    KEYS[2] shard stock          (hash: remaining, sold, returned, version, generation, ...)
    KEYS[3] shard free units     (list of "lo-hi" ranges)
    KEYS[4] shard buyers         (hash: <user_id> -> units held, <user_id>:o -> order_no)
    KEYS[5] idempotency record of the purchase (may have expired)

    ARGV[1] reason, stored on the order
    ARGV[2] units not to return, "u,u,..." (may be empty)
    ARGV[3] the order's new status: "rejected" or "released"

  Output:
    {1, returned}  done: `returned` units back in the shard
    {0, status}    nothing to do: the order is `status` already (rejected or released),
                   or a rejection met a delivered order (an endpoint that stored it and
                   then refuses a repeat must not get its units sold again)
    {-1}           no such order
]]
local rcall = redis.call

local order = rcall("HMGET", KEYS[1], "status", "units", "quantity", "user_id", "generation")
if not order[1] then
  return {-1}
end
local status = order[1]
if status ~= "admitted" and not (status == "delivered" and ARGV[3] == "released") then
  return {0, status}
end

local shard = rcall("HMGET", KEYS[2], "generation")
local sameSale = shard[1] and (not order[5] or order[5] == "" or order[5] == shard[1])
local returned = 0
if sameSale then
  local keep = {}
  for unit in string.gmatch(ARGV[2], "[^,]+") do
    keep[unit] = true
  end
  for unit in string.gmatch(order[2], "[^,]+") do
    if not keep[unit] then
      rcall("RPUSH", KEYS[3], unit .. "-" .. unit)
      returned = returned + 1
    end
  end
  rcall("HINCRBY", KEYS[2], "remaining", returned)
  rcall("HINCRBY", KEYS[2], "sold", -returned)
  rcall("HINCRBY", KEYS[2], "returned", returned)
  rcall("HINCRBY", KEYS[2], "version", 1)

  local userId = order[4]
  local held = tonumber(rcall("HGET", KEYS[4], userId) or "0") - tonumber(order[3])
  if held > 0 then
    rcall("HSET", KEYS[4], userId, held)
  else
    rcall("HDEL", KEYS[4], userId, userId .. ":o")
  end
end

rcall("HSET", KEYS[1], "status", ARGV[3], "reason", ARGV[1])
if rcall("EXISTS", KEYS[5]) == 1 then
  rcall("HSET", KEYS[5], "order_status", ARGV[3])
end
return {1, returned}
