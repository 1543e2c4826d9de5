--[[
  Take or renew the lease of a sale's admitter: one gateway process admits for a sale at
  a time; any other takes over once the holder stops renewing (it died). Safe to run
  twice.

  Input:
    KEYS[1] the sale's admitter lease (string: owner; expires)

    ARGV[1] owner (the calling process's id)
    ARGV[2] lease time, ms

  Output:
    1  the caller holds the lease (taken or renewed)
    0  another process holds it
]]
local rcall = redis.call

local holder = rcall("GET", KEYS[1])
if not holder then
  rcall("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
  return 1
end
if holder == ARGV[1] then
  rcall("PEXPIRE", KEYS[1], ARGV[2])
  return 1
end
return 0
