-- File and shell helpers shared by the specs.
local M = {}

--- A fresh empty directory under the system temp dir.
function M.tmpdir()
  local d = os.tmpname()
  os.remove(d)
  require("moelab").io.mkdir_p(d)
  return d
end

function M.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

function M.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- Runs a shell command: its output (stderr included) and exit status.
-- LuaJIT's popen:close() gives no status, so the command reports it last.
function M.sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"__rc=$?\""))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("__rc=(%d+)%s*$"))
  return (out:gsub("__rc=%d+%s*$", "")), code
end

return M
