-- wrk script for loadtest.bench's queue_poll target (the waiting room): GET
-- <path><ticket> for (user, ticket) pairs read from a file, round robin, and the same
-- JSON summary line as seckill.lua.
--
--   wrk -s poll.lua URL -- <path prefix> <file of "user ticket" lines>

local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  prefix = args[1]
  pairs_ = {}
  for line in io.lines(args[2]) do
    local user, ticket = line:match("^(%S+)%s+(%S+)$")
    if user then
      pairs_[#pairs_ + 1] = {user, ticket}
    end
  end
  n = tonumber(tid)
end

function request()
  n = n + 1
  local pair = pairs_[(n % #pairs_) + 1]
  return wrk.format("GET", prefix .. pair[2], {["X-User-Id"] = pair[1]})
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
