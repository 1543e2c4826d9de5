--[[
  Move a sale's registry record from one state to the next, only if it still belongs to
  the caller's generation (a sale deleted and created again has a new one). Safe to run
  twice: a record already in the target state of that generation answers 1.

  States: creating -> ready -> deleting -> (gone); creating -> deleting (an undone
  creation). "gone" deletes the record (the last step of a deletion). "creating" renews
  a creation's lease, only while it is still being created (never brings back a record
  deleted meanwhile).

  Input:
    KEYS[1] the SKU's registry record (hash: generation, state, lease_until, ...)

    ARGV[1] generation
    ARGV[2] target state: "creating" (a renewal), "ready", "deleting" or "gone"
    ARGV[3] lease_until, epoch ms, for "creating" and "deleting" (a creator or deleter
            that dies is finished by the next PUT or DELETE once it is over)

  Output:
    1  done (or done before)
    0  the record belongs to another generation, or is not there
]]
local rcall = redis.call

local record = rcall("HMGET", KEYS[1], "generation", "state")
if record[1] ~= ARGV[1] then
  if ARGV[2] == "gone" and not record[1] then
    return 1
  end
  return 0
end
if ARGV[2] == "gone" then
  rcall("DEL", KEYS[1])
elseif ARGV[2] == "creating" then
  if record[2] ~= "creating" then
    return 0
  end
  rcall("HSET", KEYS[1], "lease_until", ARGV[3])
elseif ARGV[2] == "ready" then
  if record[2] ~= "creating" and record[2] ~= "ready" then
    return 0
  end
  rcall("HSET", KEYS[1], "state", "ready")
  rcall("HDEL", KEYS[1], "lease_until")
else
  rcall("HSET", KEYS[1], "state", "deleting", "lease_until", ARGV[3])
end
return 1
