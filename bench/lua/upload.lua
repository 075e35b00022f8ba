-- POST /calls with `size` calls per request. args: token, size, "new" | "dup", epoch,
-- phones file. "new": every call of every request is new (times from a per-thread
-- counter); "dup": every request repeats one batch, stored by its first request (the
-- harness's warm-up), so each call is a duplicate.
local c = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local headers, size, mode, epoch, phones, counter, fixed

setup = c.setup
done = c.done

local function body(start)
  local parts = {}
  for i = 1, size do
    parts[i] = c.call_json(c.time_ms(epoch, start + i), phones[(start + i) % #phones + 1])
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function init(args)
  c.init()
  headers = c.headers(args[1])
  size = tonumber(args[2])
  mode = args[3]
  epoch = tonumber(args[4])
  phones = c.lines(args[5])
  counter = 0
  if mode == "dup" then
    tid = 0 -- every thread repeats the same batch
    math.randomseed(epoch)
    fixed = body(0)
  end
end

function request()
  if fixed then return wrk.format("POST", "/calls", headers, fixed) end
  local b = body(counter)
  counter = counter + size
  return wrk.format("POST", "/calls", headers, b)
end
