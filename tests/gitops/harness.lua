-- Runs an Argo CD health script over test objects, the way Argo CD runs it:
-- a fresh environment per object with only the libraries Argo CD opens for
-- health scripts (base, string, table, math; no os, io, require or load) and
-- the object as the global `obj`; the script's return value is the health.
--
--   lua5.4 harness.lua SCRIPT CASES   print one JSON line per case: name, status, message (or error)
--   lua5.4 harness.lua --echo CASES   print each case's object back as JSON (tests the converter)
--
-- CASES is a Lua file returning { {name = "...", obj = {...}}, ... }, written
-- by tests/gitops/luatable.py from JSON.

local BASE = {"assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring", "type",
              "xpcall", "rawequal", "rawget", "rawset", "setmetatable", "getmetatable"}

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function json(value)
  local kind = type(value)
  if kind == "string" then return json_string(value) end
  if kind == "number" then return string.format("%.17g", value) end
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
  local env = {string = string, table = table, math = math, obj = obj}
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
