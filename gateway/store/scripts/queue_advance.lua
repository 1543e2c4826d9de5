--[[
  Admit from a sale's waiting room: move the shards' admission cursors, spending at most
  what the rate's bucket holds, and publish what every gateway process answers polls
  from (the cursors, the units left, sold out or not).

  The bucket holds up to ARGV[4] admissions (one second's burst) and fills at ARGV[3]
  per second by Redis's clock; it starts empty. So in any stretch of T seconds at most
  R*T + burst tickets are admitted, whoever runs this and however often.

  ARGV[8..] is the admitter's merged order of the next tickets, as shard numbers, taken
  from base cursors ARGV[7] (as it read them): the i-th time shard s appears means its
  ticket at rank base_s + i - 1. Only the ticket right at a shard's stored cursor is
  admitted (one below it was admitted already, by another admitter, and costs nothing;
  one above it is skipped: the admitter read a stale cursor), in order, while the bucket
  holds one. Cursors only grow (a max): nothing is admitted twice, and a stale or
  repeated call admits nothing more than its budget. Safe to run twice.

  Input:
    KEYS[1] sale's queue state (hash: generation, since, last, tokens, admitted,
            c:<shard> cursor..., units_left, sold_out, joined)

    ARGV[1] generation of the sale (another one stored: the state starts afresh)
    ARGV[2] units left in the sale (as the admitter read its shards)
    ARGV[3] rate, admissions per second
    ARGV[4] burst, admissions (the bucket's size)
    ARGV[5] 1: the sale is sold out; 0: not
    ARGV[6] tickets in all shards (joined so far)
    ARGV[7] base cursors, comma separated, one per shard
    ARGV[8..] shard numbers in admission order (none: pause, only publish)

  Output:
    {admitted_now, admitted_total}
]]
local rcall = redis.call
--- @include "queue_seal"

local nowMs = queueNowMs()
if rcall("HGET", KEYS[1], "generation") ~= ARGV[1] then
  rcall("DEL", KEYS[1])
  rcall("HSET", KEYS[1], "generation", ARGV[1], "since", nowMs, "last", nowMs, "tokens", 0,
        "admitted", 0)
end
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local last = tonumber(rcall("HGET", KEYS[1], "last"))
local tokens = tonumber(rcall("HGET", KEYS[1], "tokens"))
if nowMs > last then
  tokens = math.min(burst, tokens + (nowMs - last) * rate / 1000)
  last = nowMs
end

local base = {}
local shard = 0
for value in string.gmatch(ARGV[7], "[^,]+") do
  base[shard] = tonumber(value)
  shard = shard + 1
end
local cursors = {}
local seen = {}
local admitted = 0
for i = 8, #ARGV do
  local s = ARGV[i]
  if cursors[s] == nil then
    cursors[s] = tonumber(rcall("HGET", KEYS[1], "c:" .. s) or "0")
    seen[s] = 0
  end
  local position = base[tonumber(s)] + seen[s]
  seen[s] = seen[s] + 1
  if position == cursors[s] then
    if tokens < 1 then
      break
    end
    tokens = tokens - 1
    admitted = admitted + 1
    cursors[s] = position + 1
  end
end
for s, cursor in pairs(cursors) do
  rcall("HSET", KEYS[1], "c:" .. s, cursor)
end
local total = tonumber(rcall("HINCRBY", KEYS[1], "admitted", admitted))
rcall("HSET", KEYS[1], "last", last, "tokens", tokens, "units_left", ARGV[2],
      "sold_out", ARGV[5], "joined", ARGV[6], "ticked", nowMs)
return {admitted, total}
