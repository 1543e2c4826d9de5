--[[
  Step 3 of moving units between shards: the donor's transfer record moves from
  pending to finished (kept, so that a late resend of step 1 with the same id finds it
  and takes nothing again). Safe to run twice.

  Input:
    KEYS[1] donor pending transfers    (hash: transfer id -> "receiver|ranges|count|ms")
    KEYS[2] donor finished transfers   (hash: transfer id -> the same record)

    ARGV[1] transfer id

  Output:
    1  moved to finished
    0  not pending (finished before, or never recorded)
]]
local rcall = redis.call

local record = rcall("HGET", KEYS[1], ARGV[1])
if not record then
  return 0
end
rcall("HSET", KEYS[2], ARGV[1], record)
rcall("HDEL", KEYS[1], ARGV[1])
return 1
