--[[
  takeUnits(listKey, want, fromTail): take `want` unit numbers from a shard's free
  ranges (a list of "lo-hi" strings) and return them as ranges {{lo, hi}, ...}.

  From the head (purchases: the lowest numbers first) or from the tail (moves: the
  units a shard would sell last). The caller has checked that the shard's remaining
  counter covers `want`; a list shorter than the counter is a corrupted shard: the
  script stops with an error rather than sell units it cannot name.
]]
local function takeUnits(listKey, want, fromTail)
  local taken = {}
  local index = 0
  if fromTail then
    index = -1
  end
  while want > 0 do
    local range = rcall("LINDEX", listKey, index)
    if not range then
      error("units list shorter than remaining counter")
    end
    local dash = string.find(range, "-", 1, true)
    local lo = tonumber(string.sub(range, 1, dash - 1))
    local hi = tonumber(string.sub(range, dash + 1))
    local n = math.min(want, hi - lo + 1)
    if fromTail then
      taken[#taken + 1] = {hi - n + 1, hi}
      if hi - n < lo then
        rcall("RPOP", listKey)
      else
        rcall("LSET", listKey, -1, lo .. "-" .. (hi - n))
      end
    else
      taken[#taken + 1] = {lo, lo + n - 1}
      if lo + n > hi then
        rcall("LPOP", listKey)
      else
        rcall("LSET", listKey, 0, (lo + n) .. "-" .. hi)
      end
    end
    want = want - n
  end
  return taken
end
