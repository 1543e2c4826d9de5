--[[
  Claim a SKU's registry record for a sale about to be created.

  A sale is created in steps (this claim, then its shards, each in its own slot, then
  sale_state.lua marks it ready), so a creator that crashes or times out can leave it
  half made. The record says so (`state` = creating) with a lease the creator renews;
  the next PUT of the SKU finishes it (same parameters) or, once the lease is over,
  undoes it (other parameters). A sale being deleted is finished the same way. Safe to
  run twice.

  Input:
    KEYS[1] the SKU's registry record (hash: params, generation, state, lease_until, ...)

    ARGV[1] parameters fingerprint of the sale asked for
    ARGV[2] generation for a new claim
    ARGV[3] now, epoch ms
    ARGV[4] lease, ms
    ARGV[5..] field, value, ... of the sale (written with a new claim)

  Output:
    {0, generation}  claimed now (state creating)
    {1, generation}  a creation of the same sale is under way or was cut off: go on with
                     it (its lease renewed)
    {2, state}       the SKU is taken: a sale exists (ready), or another one is being
                     created or deleted and its lease is not over
    {3, generation, state}  a creation or deletion that is over its lease: undo it (or
                     finish the deletion), then claim again
]]
local rcall = redis.call

local record = rcall("HMGET", KEYS[1], "params", "generation", "state", "lease_until")
local now = tonumber(ARGV[3])
local lease = now + tonumber(ARGV[4])
if not record[2] then
  rcall("HSET", KEYS[1], unpack(ARGV, 5))
  rcall("HSET", KEYS[1], "params", ARGV[1], "generation", ARGV[2], "state", "creating",
        "lease_until", lease)
  return {0, ARGV[2]}
end
local state = record[3]
if state == "creating" and record[1] == ARGV[1] then
  rcall("HSET", KEYS[1], "lease_until", lease)
  return {1, record[2]}
end
if state == "ready" or tonumber(record[4] or "0") > now then
  return {2, state}
end
return {3, record[2], state}
