--[[
  Waiting room pieces shared by the shard's queue scripts.

  queueNowMs(): Redis's clock, epoch ms (one clock per shard: its node's).

  queueFresh(meta, queue, generation): a queue left by another sale of the SKU (deleted
  and created again) is dropped before it is used; the meta hash is bound to this one.

  queueSealed(meta, startsAt, nowMs): true once the shard's ranks are final. At or after
  the sale's start (by this node's clock) the shard is sealed, once and for good: from
  then on every join gets a score above every score already there, so a ticket's rank
  never changes again. Before the seal, pre-start joins carry random scores (the shuffle)
  and ranks still move.
]]
local function queueNowMs()
  local t = rcall("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function queueFresh(meta, queue, generation)
  local bound = rcall("HGET", meta, "generation")
  if bound ~= generation then
    rcall("DEL", meta, queue)
    rcall("HSET", meta, "generation", generation)
  end
end

local function queueSealed(meta, startsAt, nowMs)
  if rcall("HGET", meta, "sealed") == "1" then
    return true
  end
  if nowMs >= startsAt then
    rcall("HSET", meta, "sealed", "1")
    return true
  end
  return false
end
