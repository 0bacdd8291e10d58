--- moelab.viz: figures with cairo and pango.
-- The drawing primitives are a C module (viz/*.c, built as lib/moelab/viz.so
-- only where pkg-config finds cairo and pangocairo), so the engine itself
-- never needs cairo. This file loads that module and adds the Lua parts:
--   viz.canvas{path=, width=, height=, scale=2, background=}   a PNG, PDF or SVG canvas
--   viz.svg_string(width, height, function(c) ... end)        SVG text, for inline HTML
--   viz.png_stats(path)                                        {width, height, distinct_colors, drawn_fraction, background}
--   viz.charts   heatmap, lines, bars, sankey, architecture, legend, page, figure, grid
--   viz.colors   the colour maps and the categorical palette
local MISSING = "moelab.viz needs cairo: install libcairo2-dev libpango1.0-dev and rebuild"

-- "moelab.viz" names this file on package.path, so the C module (same name,
-- found on package.cpath as lib/moelab/viz.so) is opened with loadlib.
local function load_core()
  local path = package.searchpath and package.searchpath("moelab.viz", package.cpath)
  if not path then
    for template in package.cpath:gmatch("[^;]+") do
      local p = template:gsub("%?", "moelab/viz")
      local f = io.open(p, "rb")
      if f then f:close(); path = p; break end
    end
  end
  if not path then return nil, MISSING .. " (lib/moelab/viz.so was not found on package.cpath)" end
  local open, err = package.loadlib(path, "luaopen_moelab_viz")
  if not open then return nil, MISSING .. " (" .. path .. ": " .. tostring(err) .. ")" end
  return open()
end

local ok, core, err = pcall(load_core)
if not ok then err = MISSING .. " (" .. tostring(core) .. ")"; core = nil end
if not core then error(err, 2) end

local M = {}
for k, v in pairs(core) do M[k] = v end
M.available = true

-- charts and colours load on first use
setmetatable(M, {__index = function(t, k)
  if k == "charts" or k == "colors" then
    local mod = require("moelab.viz." .. k)
    rawset(t, k, mod)
    return mod
  end
end})

package.loaded["moelab.viz"] = M
return M
