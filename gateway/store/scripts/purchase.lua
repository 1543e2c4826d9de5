--[[
  Admit one purchase on one shard of a sale, atomically.

  Checks the sale's window (on the server's clock: a gateway process with a stale view
  of the sale cannot admit outside it), the idempotency key (and the request it was
  first used for), the per-user limit and the shard's free units; takes unit numbers;
  records the buyer, the order, the key's outcome and a purchase-stream entry for the
  relay. Safe to run twice: a second run with the same key returns the first outcome
  (and says whether it was this very attempt, resent by a client library).

  A key record holding only `request` was written by claim_key.lua (the key is bound
  to this request in its own slot; the purchase runs here, in another slot): it is the
  key's first use in this slot.

  All keys share one hash tag (the shard), so on Redis Cluster they sit in one slot.

  Input:
    KEYS[1] idempotency record   (hash: request, attempt, outcome, order_no, units,
                                  order_status; expires)
    KEYS[2] shard stock          (hash: remaining, sold, limit, price, shards, version,
                                  generation, starts_at, ends_at, payment_ttl)
    KEYS[3] shard free units     (list of "lo-hi" ranges, taken from the head)
    KEYS[4] shard buyers         (hash: <user_id> -> units held, <user_id>:o -> last order_no)
    KEYS[5] order record         (hash, written only when admitted)
    KEYS[6] shard order index    (set of order_no of this sale in this shard)
    KEYS[7] shard purchase stream (the outbox the relay reads)
    KEYS[8] shard's users with an outcome other than SOLD_OUT recorded (set of user ids:
            a gateway process that knows the sale is sold out answers everyone else from
            memory, since no other outcome can be stored against their keys)

    ARGV[1] user id
    ARGV[2] sku
    ARGV[3] quantity
    ARGV[4] request fingerprint ("sku|quantity|generation": another sale is another request)
    ARGV[5] order_no to use if admitted; also names this attempt
    ARGV[6] now, epoch milliseconds
    ARGV[7] outcome ttl, seconds
    ARGV[8] shard count the caller assumed for the sale
    ARGV[9] "" to ask for units when the shard is short; else what to answer then, known
            by the caller for the whole sale: "SOLD_OUT" (no units anywhere: recorded),
            "KNOWN_SOLD_OUT" (the same, known from the sale's sold-out mark: answered,
            not recorded, so the key may buy if units come back) or
            "INSUFFICIENT_STOCK" (fewer units left than the quantity: recorded)
    ARGV[10] generation of the sale the caller means (another one: SALE_CHANGED)

  Output (first element is the code):
    {0, order_no, units_csv, amount}     OK: admitted
    {1, outcome, order_no, units_csv, order_status, same_attempt}
                                         DUPLICATE: the key was used before for this
                                         request; same_attempt 1: by this very attempt
    {2}                                  KEY_REUSED: used before for another request
    {3, order_no}                        ALREADY_PURCHASED (recorded against the key)
    {4, outcome}                         SOLD_OUT or INSUFFICIENT_STOCK, as ARGV[9]
                                         asked (recorded against the key)
    {5, missing}                         NEED_UNITS: shard short by `missing`, nothing recorded
    {6}                                  SALE_NOT_FOUND, nothing recorded
    {7, shards}                          SALE_CHANGED: another sale of the SKU is here (other
                                         generation or shard count), nothing recorded
    {8, limit}                           BAD_QUANTITY: quantity over the per-user limit
    {9, starts_at}                       NOT_STARTED: before the sale's start, nothing recorded
    {10, ends_at}                        ENDED: after the sale's end, nothing recorded
]]
local rcall = redis.call

--- @include "take_units"

local idemKey = KEYS[1]
local stockKey = KEYS[2]
local buyersKey = KEYS[4]

local userId = ARGV[1]
local quantity = tonumber(ARGV[3])
local fingerprint = ARGV[4]

local function record(outcome, orderNo, units)
  rcall("HSET", idemKey, "request", fingerprint, "attempt", ARGV[5], "outcome", outcome,
        "order_no", orderNo, "units", units, "order_status", "")
  rcall("EXPIRE", idemKey, tonumber(ARGV[7]))
  if outcome ~= "SOLD_OUT" then
    rcall("SADD", KEYS[8], userId)
  end
end

-- 1. The sale, as this shard knows it, and its window.
local sale = rcall("HMGET", stockKey, "remaining", "limit", "price", "shards", "starts_at",
                   "ends_at", "payment_ttl", "generation")
if not sale[1] then
  return {6}
end
if sale[4] ~= ARGV[8] or sale[8] ~= ARGV[10] then
  return {7, sale[4]}
end
local startsAt = tonumber(sale[5] or "0") or 0
local endsAt = tonumber(sale[6] or "0") or 0
if startsAt > 0 or endsAt > 0 then
  local clock = rcall("TIME")
  local nowMs = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  if startsAt > 0 and nowMs < startsAt then
    return {9, startsAt}
  end
  if endsAt > 0 and nowMs >= endsAt then
    return {10, endsAt}
  end
end

-- 2. The key: one key, one outcome.
local seen = rcall("HMGET", idemKey, "request", "outcome", "order_no", "units", "order_status",
                   "attempt")
if seen[1] and (seen[2] or seen[1] ~= fingerprint) then
  if seen[1] ~= fingerprint then
    return {2}
  end
  local sameAttempt = 0
  if seen[6] == ARGV[5] then
    sameAttempt = 1
  end
  return {1, seen[2], seen[3], seen[4], seen[5], sameAttempt}
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
  record("ALREADY_PURCHASED", previous, "")
  return {3, previous}
end

-- 4. Units in this shard.
if remaining < quantity then
  if ARGV[9] == "SOLD_OUT" or ARGV[9] == "INSUFFICIENT_STOCK" then
    record(ARGV[9], "", "")
    return {4, ARGV[9]}
  end
  if ARGV[9] == "KNOWN_SOLD_OUT" then
    return {4, "SOLD_OUT"}
  end
  return {5, quantity - remaining}
end
local taken = {}
for _, range in ipairs(takeUnits(KEYS[3], quantity, false)) do
  for unit = range[1], range[2] do
    taken[#taken + 1] = unit
  end
end

-- 5. Record the purchase.
local orderNo = ARGV[5]
local units = table.concat(taken, ",")
local amount = tonumber(sale[3]) * quantity
local payBy = ""
local paymentTtl = tonumber(sale[7] or "0") or 0
if paymentTtl > 0 then
  payBy = tostring(tonumber(ARGV[6]) + paymentTtl * 1000)
end
rcall("HINCRBY", stockKey, "remaining", -quantity)
rcall("HINCRBY", stockKey, "sold", quantity)
rcall("HSET", buyersKey, userId, held + quantity, userId .. ":o", orderNo)
rcall("HSET", KEYS[5], "order_no", orderNo, "sku", ARGV[2], "user_id", userId,
      "units", units, "quantity", quantity, "amount", amount, "status", "admitted",
      "admitted_at", ARGV[6], "pay_by", payBy, "idempotency_key", idemKey,
      "generation", sale[8] or "")
rcall("SADD", KEYS[6], orderNo)
rcall("XADD", KEYS[7], "*", "order_no", orderNo, "sku", ARGV[2], "user_id", userId,
      "units", units, "quantity", quantity, "amount", amount, "admitted_at", ARGV[6],
      "pay_by", payBy)
record("OK", orderNo, units)
return {0, orderNo, units, amount}
