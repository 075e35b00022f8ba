-- Shared by every scenario script: per-thread ids and seeds, reading the harness's files,
-- RFC 3339 times, US numbers, and the JSON summary the harness parses.
local M = {}

local threads = 0
function M.setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function M.init()
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

function M.lines(path)
  local out = {}
  for line in io.lines(path) do
    if line ~= "" then out[#out + 1] = line end
  end
  if #out == 0 then error("no lines in " .. path) end
  return out
end

function M.headers(token)
  local h = { ["Content-Type"] = "application/json", ["Accept"] = "application/json" }
  if token and token ~= "" then h["Authorization"] = "Bearer " .. token end
  return h
end

-- Upload times: from 2015-01-01 on (before the seeded year, which ends now), 1 ms apart.
-- A run's epoch (given by the harness, never reused on a server) owns 10^9 ms, a thread
-- 10^8 ms of it: every generated call is new.
local BASE_MS = 1420070400000
function M.time_ms(epoch, n)
  return BASE_MS + epoch * 1000000000 + (tid or 0) * 100000000 + n
end

function M.rfc3339(ms)
  local s = math.floor(ms / 1000)
  return os.date("!%Y-%m-%dT%H:%M:%S", s) .. string.format(".%03dZ", ms % 1000)
end

-- New numbers for created contacts: area codes no seeded contact uses.
-- A run's epoch owns 1.6 M of them, a thread 400,000 (epochs below 100, threads below 4).
local AREAS = { 303, 720, 206, 253, 360, 425, 509, 612, 651, 763,
                314, 816, 402, 515, 605, 701, 406, 208, 801, 505 }
function M.phone(epoch, n)
  local k = (epoch * 4 + (tid or 0)) * 400000 + n
  local area = AREAS[math.floor(k / 8000000) % #AREAS + 1]
  local sub = k % 8000000
  return string.format("+1 %d-%03d-%04d", area, 200 + math.floor(sub / 10000), sub % 10000)
end

local DIRECTIONS = { "incoming", "outgoing", "missed" }
function M.call_json(ms, phone)
  local d = DIRECTIONS[math.random(3)]
  local duration = d == "missed" and 0 or math.random(1, 900)
  return string.format('{"direction":"%s","duration_seconds":%d,"timestamp":"%s","phone_raw":"%s"}',
    d, duration, M.rfc3339(ms), phone)
end

function M.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end

return M
