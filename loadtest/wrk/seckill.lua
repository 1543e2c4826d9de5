-- wrk script for loadtest.bench: a new user id (and a new idempotency key) on every
-- request, and a JSON summary line at the end.
--
--   wrk -s seckill.lua URL -- <path> <first_user_id> [POST|GET]
--
-- POST (the default): a purchase, body {"quantity":1}, key "bench-<id>". GET: the same
-- user header only (GET /api/token). Thread t sends user ids first_user_id + t * 1e10 + 1,
-- + 2, ... so no two requests of a run, and no two runs with distinct first ids, share
-- a user.

local threads = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  path = args[1] or "/"
  first = tonumber(args[2] or "0") + tonumber(tid) * 1e10
  method = args[3] or "POST"
  sent = 0
  body = '{"quantity":1}'
end

function request()
  sent = sent + 1
  local user = string.format("%.0f", first + sent)
  if method == "GET" then
    return wrk.format("GET", path, {["X-User-Id"] = user})
  end
  return wrk.format(method, path, {
    ["X-User-Id"] = user,
    ["X-Idempotency-Key"] = "bench-" .. user,
    ["Content-Type"] = "application/json",
  }, body)
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
