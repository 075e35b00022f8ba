-- POST /contacts with a new number each request. args: token, epoch.
local c = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local headers, epoch, counter = nil, 0, 0

setup = c.setup
done = c.done

function init(args)
  c.init()
  headers = c.headers(args[1])
  epoch = tonumber(args[2])
end

function request()
  counter = counter + 1
  local b = string.format('{"name":"Bench Contact %d-%d-%d","phone_raw":"%s"}',
    epoch, tid or 0, counter, c.phone(epoch, counter))
  return wrk.format("POST", "/contacts", headers, b)
end
