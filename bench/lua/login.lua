-- POST /auth/login as one of the seeded users. args: credentials file ("email password" lines).
local c = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local bodies = {}

setup = c.setup
done = c.done

function init(args)
  c.init()
  for _, line in ipairs(c.lines(args[1])) do
    local email, password = line:match("^(%S+) (%S+)$")
    bodies[#bodies + 1] = string.format('{"email":"%s","password":"%s"}', email, password)
  end
end

function request()
  return wrk.format("POST", "/auth/login", c.headers(nil), bodies[math.random(#bodies)])
end
