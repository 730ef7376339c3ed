-- Runs an Argo CD health script over test objects, the way Argo CD runs a
-- custom health check (util/lua `runLua` with useOpenLibs false): a fresh
-- environment per object with only the base and table libraries (no string,
-- no math, no io; strings without methods) and the object as the global
-- `obj`; the script's return value is the health.
--
--   lua5.4 harness.lua SCRIPT CASES   print one JSON line per case: name, status, message (or error)
--   lua5.4 harness.lua --echo CASES   print each case's object back as JSON (tests the converter)
--
-- CASES is a Lua file returning { {name = "...", obj = {...}}, ... }, written
-- by tests/gitops/luatable.py from JSON.

local BASE = {"assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring", "type",
              "xpcall", "rawequal", "rawget", "rawset", "setmetatable", "getmetatable"}

-- What the harness itself needs, taken before the scripts' environment loses it.
local format, gsub, byte = string.format, string.gsub, string.byte

local function json_string(s)
  return '"' .. gsub(s, '[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return format("\\u%04x", byte(c))
  end) .. '"'
end

local function json(value)
  local kind = type(value)
  if kind == "string" then return json_string(value) end
  if kind == "number" then return format("%.17g", value) end
  if kind == "boolean" then return tostring(value) end
  if kind ~= "table" then error("cannot encode a " .. kind) end
  if #value > 0 then
    local items = {}
    for i = 1, #value do items[i] = json(value[i]) end
    return "[" .. table.concat(items, ",") .. "]"
  end
  local keys = {}
  for k in pairs(value) do keys[#keys + 1] = k end
  table.sort(keys)
  local items = {}
  for i, k in ipairs(keys) do items[i] = json_string(k) .. ":" .. json(value[k]) end
  return "{" .. table.concat(items, ",") .. "}"
end

local function sandbox(obj)
  local env = {table = table, obj = obj}
  for _, name in ipairs(BASE) do env[name] = _G[name] end
  return env
end

local echo = arg[1] == "--echo"
local cases = dofile(arg[2])
local source
if not echo then
  local file = assert(io.open(arg[1], "r"))
  source = file:read("a")
  file:close()
end

-- Argo CD's interpreter opens no string library, so strings have no methods there either.
getmetatable("").__index = nil

for _, case in ipairs(cases) do
  local out = {name = case.name}
  if echo then
    out.object = case.obj
  else
    local chunk, err = load(source, "=" .. arg[1], "t", sandbox(case.obj))
    if chunk == nil then
      out.error = err
    else
      local ok, hs = pcall(chunk)
      if not ok then
        out.error = tostring(hs)
      elseif type(hs) ~= "table" then
        out.error = "the script returned a " .. type(hs) .. ", not a table"
      elseif type(hs.status) ~= "string" or type(hs.message) ~= "string" then
        out.error = "status and message must be strings, got " .. type(hs.status) .. " and " .. type(hs.message)
      else
        out.status, out.message = hs.status, hs.message
      end
    end
  end
  print(json(out))
end
