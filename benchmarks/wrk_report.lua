-- wrk script: counts responses per status code across threads and prints
-- machine-readable lines after wrk's own report (read by bench_http.py).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  codes = {}
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local c = t:get("codes")
    for k, v in pairs(c) do
      agg[k] = (agg[k] or 0) + v
    end
  end
  for k, v in pairs(agg) do
    io.write(string.format("BENCH status %d %d\n", k, v))
  end
  local e = summary.errors
  io.write(string.format("BENCH requests %d\n", summary.requests))
  io.write(string.format("BENCH duration_us %d\n", summary.duration))
  io.write(string.format("BENCH errors %d %d %d %d %d\n", e.connect, e.read,
                         e.write, e.status, e.timeout))
  for _, p in ipairs({50, 90, 99}) do
    io.write(string.format("BENCH latency_p%d_us %d\n", p, latency:percentile(p)))
  end
end
