--[[
  Read a sale's registry record (generation, state, the sold-out mark, the count of
  returns). A script only so that the read travels in the batcher's pipeline with the
  purchases, one connection per node: at a sell-out every buyer whose shard is empty
  reads it, and redis-py's clients open a connection per concurrent command. Reads
  only: safe to run any number of times.

  Input:
    KEYS[1] the sale's registry record (hash)

  Output:
    the record as a flat array: field, value, field, value, ... (empty: no record)
]]
local rcall = redis.call

return rcall("HGETALL", KEYS[1])
