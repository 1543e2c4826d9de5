--[[
  Announce, then count, units going back to a sale (see mark_sold_out.lua): "begin"
  before compensate.lua gives them back, "end" after. Only for the sale the order was
  bought in (its generation): an order of a deleted sale writes nothing, and neither
  does anything after the sale's record is gone. Safe to run twice (a second "end"
  counts once more: a needless count only costs the next sold-out check one more
  consistent read).

  Input:
    KEYS[1] the sale's registry record (hash: generation, returns, returning:<order_no>, ...)

    ARGV[1] "begin", "end" (units went back: count them), or "cancel" (nothing went back)
    ARGV[2] order_no
    ARGV[3] generation of the sale the order was bought in ("" : whichever)
    ARGV[4] now, epoch ms

  Output:
    1  written
    0  no such sale (or another generation of it): nothing written
]]
local rcall = redis.call

local generation = rcall("HGET", KEYS[1], "generation")
if not generation or (ARGV[3] ~= "" and generation ~= ARGV[3]) then
  return 0
end
local field = "returning:" .. ARGV[2]
if ARGV[1] == "begin" then
  rcall("HSET", KEYS[1], field, ARGV[4])
else
  if ARGV[1] == "end" then
    rcall("HINCRBY", KEYS[1], "returns", 1)
  end
  rcall("HDEL", KEYS[1], field)
end
return 1
