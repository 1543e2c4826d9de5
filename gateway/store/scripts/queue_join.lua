--[[
  Join a sale's waiting room in the user's shard (the user's place, if held already).

  A user is one member of the shard's sorted set, so a user never holds two places, and
  joining again returns the same place. Before the shard is sealed (the sale's start, by
  this node's clock), a join is scored with the caller's random number in [0, 1): those
  who join before the start are put in a random order. After it, a join is scored with
  this node's clock in microseconds (above 1e15, so above every pre-start score), at
  least one above the shard's last score: the shard only grows at its end, and a rank,
  once sealed, is final. Safe to run twice: the second run finds the member.

  Input:
    KEYS[1] shard stock     (hash: ..., generation; the sale's shard, this generation)
    KEYS[2] shard queue     (sorted set: user id -> score)
    KEYS[3] shard queue meta (hash: generation, sealed, last)

    ARGV[1] user id
    ARGV[2] generation of the sale
    ARGV[3] starts_at, epoch ms (0: none)
    ARGV[4] pre-start score: a random number in [0, 1)

  Output:
    {0, rank, pre}  in the queue; rank (0-based) when the shard is sealed, else -1;
                    pre 1 when the place was taken before the start (a shuffled score)
    {2}             SALE_CHANGED: no shard of this generation (deleted, re-created)
]]
local rcall = redis.call
--- @include "queue_seal"

if rcall("HGET", KEYS[1], "generation") ~= ARGV[2] then
  return {2}
end
queueFresh(KEYS[3], KEYS[2], ARGV[2])
local nowMs = queueNowMs()
local sealed = queueSealed(KEYS[3], tonumber(ARGV[3]), nowMs)
local score = rcall("ZSCORE", KEYS[2], ARGV[1])
if not score then
  if sealed then
    local t = rcall("TIME")
    local micros = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local last = tonumber(rcall("HGET", KEYS[3], "last") or "0")
    if micros <= last then
      micros = last + 1
    end
    rcall("HSET", KEYS[3], "last", string.format("%.0f", micros))
    score = string.format("%.0f", micros)
  else
    score = ARGV[4]
  end
  rcall("ZADD", KEYS[2], score, ARGV[1])
end
local pre = 0
if tonumber(score) < 1 then
  pre = 1
end
if sealed then
  return {0, rcall("ZRANK", KEYS[2], ARGV[1]), pre}
end
return {0, -1, pre}
