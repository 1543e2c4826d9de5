--[[
  A ticket's rank in its shard's queue, once the shard is sealed (the sale's start, by
  this node's clock; sealing it here if it is time). Asked once per pre-start ticket
  after the start (the caller keeps the answer: a sealed rank never changes). Safe to
  run twice.

  Input:
    KEYS[1] shard stock     (hash: ..., generation)
    KEYS[2] shard queue     (sorted set: user id -> score)
    KEYS[3] shard queue meta (hash: generation, sealed, last)

    ARGV[1] user id
    ARGV[2] generation of the sale
    ARGV[3] starts_at, epoch ms (0: none)

  Output:
    {0, rank}  the rank (0-based), final
    {1}        not sealed yet (this node's clock is before the start)
    {2}        SALE_CHANGED: no shard of this generation
    {3}        the user holds no place in this shard's queue
]]
local rcall = redis.call
--- @include "queue_seal"

if rcall("HGET", KEYS[1], "generation") ~= ARGV[2] then
  return {2}
end
queueFresh(KEYS[3], KEYS[2], ARGV[2])
if not queueSealed(KEYS[3], tonumber(ARGV[3]), queueNowMs()) then
  return {1}
end
local rank = rcall("ZRANK", KEYS[2], ARGV[1])
if not rank then
  return {3}
end
return {0, rank}
