-- Argo CD health check for kubetune.io/FineTuneJob.
-- Argo CD runs it with the live object as the global `obj` and reads the
-- table it returns. The rules and their reasons: docs/gitops.md. Tested under
-- lua5.4 over status objects recorded from the operator's own code
-- (tests/gitops). Plain Lua 5.1 (Argo CD's interpreter) using only what Argo
-- CD opens for a custom health check: the base and table libraries (no
-- string, no math: no `useOpenLibs` needed); every number may arrive as a
-- float.
local hs = {}

local DIGITS = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}
local PHASE_WORDS = {Pending = "pending", Queued = "queued", Validating = "validating", Training = "training",
                     Merging = "merging", Evaluating = "evaluating", Deploying = "deploying", Serving = "serving"}

-- An integer in decimal, whether it arrived as 42 or 42.0.
local function num(n)
  if type(n) ~= "number" then
    return tostring(n)
  end
  local sign = ""
  if n < 0 then
    sign, n = "-", -n
  end
  n = n - n % 1
  local out = ""
  repeat
    local digit = n % 10
    out = DIGITS[digit + 1] .. out
    n = (n - digit) / 10
  until n < 1
  return sign .. out
end

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function detail(text)
  if text ~= nil and text ~= "" then
    return ": " .. text
  end
  return ""
end

local function result(health, message)
  hs.status = health
  hs.message = message
  return hs
end

local status = obj.status
if status == nil or status.phase == nil then
  return result("Progressing", "waiting for the kubetune operator to accept the job")
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  return result("Progressing", "waiting for the operator to observe generation " .. num(generation))
end

local phase = status.phase
local message = status.message or ""
local promoted = condition(status, "Promoted")
local stalled = condition(status, "Stalled")
local ready = condition(status, "Ready")
local deployed = condition(status, "Deployed")

-- An earlier revision has the endpoint while the one the spec asks for is built; while it answers,
-- the job stays Ready on it.
local earlier = status.endpoint ~= nil and status.servingRevision ~= nil and status.revision ~= nil
  and status.servingRevision ~= status.revision
local serving_earlier = earlier and ready ~= nil and ready.status == "True"
local still_serving = ""
if earlier then
  still_serving = "; revision " .. status.servingRevision .. " keeps serving"
end

local percent = ""
if phase == "Training" and status.progress ~= nil and status.progress.percent ~= nil then
  percent = " (" .. num(status.progress.percent) .. "% trained)"
end

-- The new revision was held back (its gate, its canary or a stage failed): the edit will not take
-- effect until the spec changes again. Promoted=False while it is still built is RolloutInProgress.
if promoted ~= nil and promoted.status == "False" and promoted.reason ~= "RolloutInProgress" then
  return result("Degraded", tostring(promoted.reason) .. detail(promoted.message))
end

if phase == "Failed" then
  return result("Degraded", "Failed" .. detail(message) .. still_serving)
end

if stalled ~= nil and stalled.status == "True" then
  return result("Degraded", "Stalled (" .. tostring(stalled.reason) .. ")" .. detail(stalled.message) .. still_serving)
end

if phase == "Deploying" and deployed ~= nil and deployed.reason == "ScaledToZero" then
  return result("Suspended", "ScaledToZero" .. detail(deployed.message))
end

if serving_earlier then
  return result("Healthy", "serving revision " .. status.servingRevision .. " while revision " .. status.revision
    .. " is " .. (PHASE_WORDS[phase] or tostring(phase)) .. percent .. detail(message))
end

if phase == "Serving" then
  if ready ~= nil and ready.status == "True" then
    local at = ""
    if status.endpoint ~= nil and status.endpoint.url ~= nil then
      at = " at " .. status.endpoint.url
    end
    return result("Healthy", "serving revision " .. tostring(status.servingRevision) .. at)
  end
  return result("Progressing", "Serving, waiting for the Ready condition")
end

if phase == "Succeeded" then
  return result("Healthy", "Succeeded" .. detail(message))
end

-- Waiting for Kueue is not Suspended: nobody paused the job, it starts by itself once admitted.
if phase == "Queued" then
  return result("Progressing", "Queued" .. detail(message))
end

if phase == "Pending" or phase == "Validating" or phase == "Training" or phase == "Merging"
    or phase == "Evaluating" or phase == "Deploying" then
  return result("Progressing", phase .. percent .. detail(message))
end

return result("Unknown", "unknown phase " .. tostring(phase) .. ": use the health check of this operator version")
