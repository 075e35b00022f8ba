-- POST /sync with 50 new contacts and 200 new calls of their numbers, from a changes
-- cursor. args: token, epoch, cursor ("" for none).
local c = dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local headers, epoch, cursor, counter = nil, 0, "", 0

setup = c.setup
done = c.done

function init(args)
  c.init()
  headers = c.headers(args[1])
  epoch = tonumber(args[2])
  cursor = args[3] or ""
end

function request()
  local contacts, calls, numbers = {}, {}, {}
  for i = 1, 50 do
    counter = counter + 1
    numbers[i] = c.phone(epoch, counter)
    contacts[i] = string.format('{"name":"Sync Contact %d-%d-%d","phone_raw":"%s"}',
      epoch, tid or 0, counter, numbers[i])
  end
  for i = 1, 200 do
    calls[i] = c.call_json(c.time_ms(epoch, counter * 4 + i), numbers[(i - 1) % 50 + 1])
  end
  local tail = cursor ~= "" and string.format(',"cursor":"%s"}', cursor) or "}"
  local b = '{"contacts":[' .. table.concat(contacts, ",") .. '],"calls":[' ..
    table.concat(calls, ",") .. "]" .. tail
  return wrk.format("POST", "/sync", headers, b)
end
