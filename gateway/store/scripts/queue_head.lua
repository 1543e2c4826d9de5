--[[
  The admitter's look at one shard: its queue's length, its free units and, once the
  shard is sealed, the next tickets from the admission cursor on (with their scores,
  which the admitter merges across shards: admission follows the scores). Seals the
  shard when it is time. Safe to run twice.

  Input:
    KEYS[1] shard stock     (hash: remaining, ..., generation)
    KEYS[2] shard queue     (sorted set: user id -> score)
    KEYS[3] shard queue meta (hash: generation, sealed, last)

    ARGV[1] generation of the sale
    ARGV[2] starts_at, epoch ms (0: none)
    ARGV[3] the shard's admission cursor (ranks below it are admitted)
    ARGV[4] how many tickets to return at most, from the cursor on

  Output:
    {0, sealed, length, remaining, score1, score2, ...}
                 sealed 1/0; the scores of the tickets at ranks cursor, cursor+1, ...
                 (none when not sealed)
    {2}          SALE_CHANGED: no shard of this generation
]]
local rcall = redis.call
--- @include "queue_seal"

if rcall("HGET", KEYS[1], "generation") ~= ARGV[1] then
  return {2}
end
queueFresh(KEYS[3], KEYS[2], ARGV[1])
local sealed = queueSealed(KEYS[3], tonumber(ARGV[2]), queueNowMs())
local reply = {0, 0, rcall("ZCARD", KEYS[2]), tonumber(rcall("HGET", KEYS[1], "remaining") or "0")}
if sealed then
  reply[2] = 1
  local count = tonumber(ARGV[4])
  if count > 0 then
    local cursor = tonumber(ARGV[3])
    local entries = rcall("ZRANGE", KEYS[2], cursor, cursor + count - 1, "WITHSCORES")
    for i = 2, #entries, 2 do
      reply[#reply + 1] = entries[i]
    end
  end
end
return reply
