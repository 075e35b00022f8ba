-- GET one of the paths in a file. args: token, paths file, "random" | "cycle".
-- "cycle" walks the file in order from a per-thread start (the /contacts/changes walk).
local c = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local paths, mode, headers, n = nil, "random", nil, 0

setup = c.setup
done = c.done

function init(args)
  c.init()
  headers = c.headers(args[1])
  paths = c.lines(args[2])
  mode = args[3] or "random"
  n = ((tid or 0) * 7) % #paths
end

function request()
  local path
  if mode == "cycle" then
    n = n % #paths + 1
    path = paths[n]
  else
    path = paths[math.random(#paths)]
  end
  return wrk.format("GET", path, headers)
end
