-- File and shell helpers shared by the specs.
local M = {}

-- Every path tmpdir and tmpname hand out, for cleanup() to remove.
local made = {}

--- A fresh empty directory under the system temp dir; cleanup() removes it.
function M.tmpdir()
  local d = os.tmpname()
  os.remove(d)
  made[#made + 1] = d
  require("moelab").io.mkdir_p(d)
  return d
end

--- A fresh temp file name, `suffix` appended; cleanup() removes it. os.tmpname
-- makes an empty file, so with a suffix that file is recorded too.
function M.tmpname(suffix)
  local p = os.tmpname()
  made[#made + 1] = p
  if suffix then
    p = p .. suffix
    made[#made + 1] = p
  end
  return p
end

--- Removes (recursively) every path tmpdir and tmpname made. A spec that uses
-- them calls `teardown(files.cleanup)` at file level.
function M.cleanup()
  for i = #made, 1, -1 do
    os.execute("rm -rf '" .. made[i] .. "'")
    made[i] = nil
  end
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
