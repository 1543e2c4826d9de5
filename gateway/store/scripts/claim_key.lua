--[[
  Bind an idempotency key to one request (SKU and quantity) in the key's own slot.

  A key's record lives in the slot of `user_id % 16` whatever the sale's shard count,
  so a key used for one sale is seen when it is sent for another. When a purchase's
  shard is that slot, purchase.lua reads and writes the record itself, in the same
  atomic call; for a purchase in another slot, this script binds the key first, and the
  purchase then keeps its outcome in its own slot. Safe to run twice.

  Every send of the key renews the binding (ARGV[2] is longer than an outcome's TTL): the
  purchase that follows writes its outcome, with a fresh TTL, in its own slot, and the
  binding must outlive it, or the key, its outcome still stored, buys on another sale.

  Input:
    KEYS[1] the key's record      (hash: request, ...; expires)

    ARGV[1] request fingerprint ("sku|quantity|generation")
    ARGV[2] ttl, seconds (the outcome's TTL and a margin)

  Output:
    0  bound now
    1  bound to this request before (the purchase's own slot has its outcome)
    2  KEY_REUSED: bound to another request
]]
local rcall = redis.call

local bound = rcall("HGET", KEYS[1], "request")
if bound then
  if bound ~= ARGV[1] then
    return 2
  end
  rcall("EXPIRE", KEYS[1], tonumber(ARGV[2]))
  return 1
end
rcall("HSET", KEYS[1], "request", ARGV[1])
rcall("EXPIRE", KEYS[1], tonumber(ARGV[2]))
return 0
