--- moelab.viz.colors: colour maps and palettes for figures.
-- The maps are built from a few anchor colours chosen for this project and
-- interpolated in CIELAB, so equal steps in value look like roughly equal
-- steps in colour. The sequential map runs light to dark with lightness
-- falling monotonically (it reads in greyscale and for colour-blind readers);
-- the diverging map runs blue - near-white - orange, a pair that stays apart
-- under the common colour-vision deficiencies. The categorical palette uses
-- hues in the spirit of the Okabe-Ito set (values chosen here).
local M = {}

local floor, max, min = math.floor, math.max, math.min

--- hex("#rrggbb") -> r, g, b in 0..1
function M.hex(s)
  if type(s) ~= "string" or not s:match("^#%x%x%x%x%x%x$") then
    error("colors.hex: expected \"#rrggbb\", got " .. tostring(s), 2)
  end
  return tonumber(s:sub(2, 3), 16) / 255, tonumber(s:sub(4, 5), 16) / 255, tonumber(s:sub(6, 7), 16) / 255
end

--- to_hex(r, g, b) -> "#rrggbb"
function M.to_hex(r, g, b)
  local function byte(v) return max(0, min(255, floor(v * 255 + 0.5))) end
  return string.format("#%02x%02x%02x", byte(r), byte(g), byte(b))
end

-- sRGB <-> CIELAB (D65 white)
local function to_linear(c)
  if c <= 0.04045 then return c / 12.92 end
  return ((c + 0.055) / 1.055) ^ 2.4
end

local function from_linear(c)
  if c <= 0.0031308 then return 12.92 * c end
  return 1.055 * c ^ (1 / 2.4) - 0.055
end

local XN, YN, ZN = 0.95047, 1.0, 1.08883
local function f_lab(t)
  if t > 216 / 24389 then return t ^ (1 / 3) end
  return (24389 / 27 * t + 16) / 116
end
local function f_lab_inv(t)
  if t ^ 3 > 216 / 24389 then return t ^ 3 end
  return (116 * t - 16) / (24389 / 27)
end

--- rgb_to_lab(r, g, b) -> L, a, b
function M.rgb_to_lab(r, g, b)
  r, g, b = to_linear(r), to_linear(g), to_linear(b)
  local x = 0.4124564 * r + 0.3575761 * g + 0.1804375 * b
  local y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
  local z = 0.0193339 * r + 0.1191920 * g + 0.9503041 * b
  local fx, fy, fz = f_lab(x / XN), f_lab(y / YN), f_lab(z / ZN)
  return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)
end

--- lab_to_rgb(L, a, b) -> r, g, b (clamped to 0..1)
function M.lab_to_rgb(l, a, bb)
  local fy = (l + 16) / 116
  local fx, fz = fy + a / 500, fy - bb / 200
  local x, y, z = XN * f_lab_inv(fx), YN * f_lab_inv(fy), ZN * f_lab_inv(fz)
  local r = 3.2404542 * x - 1.5371385 * y - 0.4985314 * z
  local g = -0.9692660 * x + 1.8760108 * y + 0.0415560 * z
  local b = 0.0556434 * x - 0.2040259 * y + 1.0572252 * z
  local function clamp(v) return max(0, min(1, from_linear(max(0, v)))) end
  return clamp(r), clamp(g), clamp(b)
end

--- luminance(r, g, b): relative luminance (WCAG), 0..1
function M.luminance(r, g, b)
  return 0.2126 * to_linear(r) + 0.7152 * to_linear(g) + 0.0722 * to_linear(b)
end

--- text_on(r, g, b) -> "#ffffff" or "#1a1a1a", whichever reads better on that fill
function M.text_on(r, g, b)
  local lum = M.luminance(r, g, b)
  -- contrast against white vs against near-black
  if (1.05 / (lum + 0.05)) >= ((lum + 0.05) / 0.06) then return "#ffffff" end
  return "#1a1a1a"
end

-- Anchors (chosen for this project). Sequential: pale cream -> yellow-green
-- -> teal -> blue -> deep indigo, lightness falling at every anchor.
M.anchors = {
  sequential = {"#fff7d4", "#a6d47d", "#4cac85", "#147c96", "#1a4b8a", "#231c58"},
  diverging = {"#1f5ca3", "#7fb0dc", "#f4f2ee", "#eca266", "#a8461a"},
}

local RES = 256
local luts = {}

local function build(name)
  local anchors = M.anchors[name]
  local labs = {}
  for i, h in ipairs(anchors) do labs[i] = {M.rgb_to_lab(M.hex(h))} end
  local lut = {}
  local n = #labs
  for i = 0, RES - 1 do
    local t = i / (RES - 1) * (n - 1)
    local k = min(n - 1, floor(t) + 1)
    local f = t - (k - 1)
    local a, b = labs[k], labs[k + 1]
    lut[i] = {M.lab_to_rgb(a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f, a[3] + (b[3] - a[3]) * f)}
  end
  luts[name] = lut
  return lut
end

--- map(name, t) -> r, g, b for t in 0..1 (clamped); name "sequential" or "diverging"
function M.map(name, t)
  local lut = luts[name] or (M.anchors[name] and build(name))
  if not lut then
    error("colors.map: unknown colour map '" .. tostring(name) .. "' (known: sequential, diverging)", 2)
  end
  if type(t) ~= "number" or t ~= t then t = 0 end
  local i = floor(max(0, min(1, t)) * (RES - 1) + 0.5)
  local c = lut[i]
  return c[1], c[2], c[3]
end

function M.sequential(t) return M.map("sequential", t) end
function M.diverging(t) return M.map("diverging", t) end

-- Categorical: eight hues told apart with the common colour-vision
-- deficiencies; after eight they repeat (charts then vary dashes as well).
M.palette = {
  "#2c6fbb", -- blue
  "#e69420", -- orange
  "#17a07a", -- bluish green
  "#d4542a", -- vermillion
  "#62b4e6", -- sky blue
  "#bf72a3", -- reddish purple
  "#d9bb2b", -- yellow
  "#5e5e5e", -- dark grey
}
M.other = "#b5b5b5"      -- "other", merged or missing things
M.missing = "#d9d9d9"    -- cells without a value
M.accent = M.palette[2]

--- categorical(i) -> "#rrggbb", i = 1, 2, ... (wraps after eight)
function M.categorical(i)
  if type(i) ~= "number" then error("colors.categorical: expected an index, got " .. type(i), 2) end
  return M.palette[(floor(i) - 1) % #M.palette + 1]
end

--- rgba(hex, alpha) -> {r, g, b, a}, a colour table the canvas accepts
function M.rgba(h, a)
  local r, g, b = M.hex(h)
  return {r, g, b, a or 1}
end

--- lighten(hex, amount) -> "#rrggbb", mixed toward white in CIELAB (amount 0..1)
function M.lighten(h, amount)
  local l, a, b = M.rgb_to_lab(M.hex(h))
  amount = max(0, min(1, amount or 0.5))
  return M.to_hex(M.lab_to_rgb(l + (100 - l) * amount, a * (1 - amount), b * (1 - amount)))
end

return M
