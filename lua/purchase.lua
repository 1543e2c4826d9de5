--[[
  Admit one purchase on one shard of a sale, atomically.

  Checks the idempotency key (and its fingerprint), the sale, the per-user limit
  and the shard's free units; takes unit numbers; records the buyer, the order,
  the key's outcome and a purchase-stream entry for the relay.
  Running it twice with one key returns the first outcome.

  All keys share one hash tag (the shard), so on Redis Cluster they sit in one slot.

  Input:
    KEYS[1] idempotency record  (hash: fp, req, st, code, ord, units, ost; expires)
    KEYS[2] shard stock          (hash: remaining, sold, limit, price, shards, ver)
    KEYS[3] shard free units     (list of "lo-hi" ranges, taken from the head)
    KEYS[4] shard buyers         (hash: <user_id> -> units held, <user_id>:o -> last order_no)
    KEYS[5] order record         (hash, written only when admitted)
    KEYS[6] shard order index    (set of order_no of this sale in this shard)
    KEYS[7] shard purchase stream (the outbox the relay reads)

    ARGV[1] user id
    ARGV[2] sku
    ARGV[3] quantity
    ARGV[4] request fingerprint (sku and quantity)
    ARGV[5] order_no to use if admitted; also names this attempt, so that a client
            library resending the call after a lost reply gets its own outcome back
    ARGV[6] now, epoch milliseconds
    ARGV[7] outcome ttl, seconds
    ARGV[8] shard count the caller assumed for the sale
    ARGV[9] "" to ask for units when the shard is short; else the outcome to record
            then, known by the caller for the whole sale: "SOLD_OUT" (no units anywhere)
            or "INSUFFICIENT_STOCK" (fewer units left than the quantity)

  Output (first element is the code):
    {0, order_no, units_csv, amount}          OK: admitted
    {1, status, code, order_no, units_csv, order_status, same_attempt}
                                              DUPLICATE: key used before for this request;
                                              same_attempt 1: by this very attempt (a resend)
    {2}                                       KEY_REUSED: key used before for another request
    {3, order_no}                             ALREADY_PURCHASED (recorded against the key)
    {4, code}                                 SOLD_OUT or INSUFFICIENT_STOCK, as ARGV[9]
                                              asked (recorded against the key)
    {5, missing}                              NEED_UNITS: shard short by `missing`, nothing recorded
    {6}                                       SALE_NOT_FOUND, nothing recorded
    {7, shards}                               SHARDS_MISMATCH: the sale has another shard count
    {8, limit}                                BAD_QUANTITY: quantity over the per-user limit
]]
local rcall = redis.call

local idemKey = KEYS[1]
local stockKey = KEYS[2]
local unitsKey = KEYS[3]
local buyersKey = KEYS[4]

local userId = ARGV[1]
local quantity = tonumber(ARGV[3])
local fingerprint = ARGV[4]
local ttl = tonumber(ARGV[7])

local function record(status, code, orderNo, units)
  rcall("HSET", idemKey, "fp", fingerprint, "req", ARGV[5], "st", status, "code", code,
        "ord", orderNo, "units", units, "ost", "")
  rcall("EXPIRE", idemKey, ttl)
end

-- 1. The key: one key, one outcome.
local seen = rcall("HMGET", idemKey, "fp", "st", "code", "ord", "units", "ost", "req")
if seen[1] then
  if seen[1] ~= fingerprint then
    return {2}
  end
  local sameAttempt = 0
  if seen[7] == ARGV[5] then
    sameAttempt = 1
  end
  return {1, seen[2], seen[3], seen[4], seen[5], seen[6], sameAttempt}
end

-- 2. The sale, as this shard knows it.
local sale = rcall("HMGET", stockKey, "remaining", "limit", "price", "shards")
if not sale[1] then
  return {6}
end
if sale[4] ~= ARGV[8] then
  return {7, sale[4]}
end
local remaining = tonumber(sale[1])
local limit = tonumber(sale[2])
if quantity > limit then
  return {8, limit}
end

-- 3. The per-user limit.
local held = tonumber(rcall("HGET", buyersKey, userId) or "0")
if held + quantity > limit then
  local previous = rcall("HGET", buyersKey, userId .. ":o") or ""
  record(409, "ALREADY_PURCHASED", previous, "")
  return {3, previous}
end

-- 4. Units in this shard.
if remaining < quantity then
  if ARGV[9] == "SOLD_OUT" then
    record(410, "SOLD_OUT", "", "")
    return {4, "SOLD_OUT"}
  elseif ARGV[9] == "INSUFFICIENT_STOCK" then
    record(409, "INSUFFICIENT_STOCK", "", "")
    return {4, "INSUFFICIENT_STOCK"}
  end
  return {5, quantity - remaining}
end

local taken = {}
local need = quantity
while need > 0 do
  local range = rcall("LINDEX", unitsKey, 0)
  if not range then
    return redis.error_reply("ERR units list shorter than remaining counter")
  end
  local dash = string.find(range, "-", 1, true)
  local lo = tonumber(string.sub(range, 1, dash - 1))
  local hi = tonumber(string.sub(range, dash + 1))
  local n = math.min(need, hi - lo + 1)
  for unit = lo, lo + n - 1 do
    taken[#taken + 1] = unit
  end
  if lo + n > hi then
    rcall("LPOP", unitsKey)
  else
    rcall("LSET", unitsKey, 0, (lo + n) .. "-" .. hi)
  end
  need = need - n
end

-- 5. Record the purchase.
local orderNo = ARGV[5]
local units = table.concat(taken, ",")
local amount = tonumber(sale[3]) * quantity
rcall("HINCRBY", stockKey, "remaining", -quantity)
rcall("HINCRBY", stockKey, "sold", quantity)
rcall("HSET", buyersKey, userId, held + quantity, userId .. ":o", orderNo)
rcall("HSET", KEYS[5], "order_no", orderNo, "sku", ARGV[2], "user_id", userId,
      "units", units, "quantity", quantity, "amount", amount, "status", "admitted",
      "admitted_at", ARGV[6], "idem", idemKey)
rcall("SADD", KEYS[6], orderNo)
rcall("XADD", KEYS[7], "*", "order_no", orderNo, "sku", ARGV[2], "user_id", userId,
      "units", units, "quantity", quantity, "amount", amount, "admitted_at", ARGV[6])
record(200, "OK", orderNo, units)
return {0, orderNo, units, amount}
