-- moelab.viz: the cairo canvas (PNG, PDF, SVG), svg_string, png_stats, the
-- charts (each rendered in all three formats and checked: PNG signature and
-- IHDR size, pixels actually drawn, PDF header and page count via pdfinfo,
-- SVG markup), colour maps, and bad arguments everywhere. Where cairo is
-- missing (lib/moelab/viz.so not built) the whole spec is pending.
local moe = require "moelab"
local files = require "helpers.files"
local tmpdir, read, exists = files.tmpdir, files.read, files.exists

local have_viz, viz = pcall(require, "moelab.viz")
if not have_viz then
  describe("moelab.viz", function()
    pending("cairo is missing, so lib/moelab/viz.so is not built: " .. tostring(viz))
  end)
  return
end

local charts, colors = viz.charts, viz.colors

local function fails(pattern, f, ...)
  local ok, msg = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "', the call succeeded")
  msg = tostring(msg)
  assert(msg:find(pattern, 1, true), "error '" .. msg .. "' does not contain '" .. pattern .. "'")
  return msg
end

-- PNG: the 8-byte signature, then the IHDR chunk with big-endian width and height
local function png_size(path)
  local s = read(path)
  assert.are.equal("\137PNG\r\n\26\n", s:sub(1, 8), "not a PNG signature: " .. path)
  assert.are.equal("IHDR", s:sub(13, 16))
  local function be32(i)
    local a, b, c, d = s:byte(i, i + 3)
    return ((a * 256 + b) * 256 + c) * 256 + d
  end
  return be32(17), be32(21)
end

local function sh_ok(cmd)
  local r = os.execute(cmd)
  return r == 0 or r == true
end

local have_pdfinfo = sh_ok("command -v pdfinfo >/dev/null 2>&1")

local function pdf_pages(path)
  local p = io.popen("pdfinfo '" .. path .. "' 2>&1")
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("Pages:%s*(%d+)")), out
end

local function check_pdf(path, pages)
  local s = read(path)
  assert.are.equal("%PDF", s:sub(1, 4))
  if have_pdfinfo then
    local n, out = pdf_pages(path)
    assert.are.equal(pages or 1, n, "pdfinfo: " .. out)
  end
end

local function check_svg(s)
  assert.is_truthy(s:match("^%s*<%?xml") or s:match("^%s*<svg"), "not SVG: " .. s:sub(1, 60))
  assert.is_truthy(s:find("<svg", 1, true))
  assert.is_truthy(s:find("<path", 1, true) or s:find("<rect", 1, true), "SVG without shapes")
  assert.is_truthy(s:find("</svg>", 1, true))
end

-- ------------------------------------------------------------ fixtures

local function lcg(seed)
  local s = seed
  return function()
    s = (s * 1103515245 + 12345) % 2147483648
    return s / 2147483648
  end
end

local rnd = lcg(42)
local load_matrix, rows, cols = {}, {}, {}
for l = 1, 6 do
  rows[l] = "layer " .. l
  load_matrix[l] = {}
  for e = 1, 16 do load_matrix[l][e] = (0.4 + 1.2 * rnd()) / 16 end
end
for e = 1, 16 do cols[e] = tostring(e - 1) end
load_matrix[2][3] = 0 / 0   -- a missing cell

local steps, loss_a, loss_b = {}, {}, {}
for i = 1, 300 do
  steps[i] = i
  loss_a[i] = 5 * math.exp(-i / 70) + 1.2 + 0.05 * rnd()
  loss_b[i] = (i > 100 and i < 120) and (0 / 0) or 5 * math.exp(-i / 50) + 1.1
end

local flows = {}
for t = 1, 2000 do
  local e1 = math.floor(rnd() ^ 2 * 12)
  local e2 = (e1 + math.floor(rnd() * 3)) % 12
  flows[t] = {e1, e2, rnd() < 0.6 and (e2 * 2) % 12 or math.floor(rnd() * 12)}
end

local mixtral = {name = "Mixtral-style", vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4,
                 num_kv_heads = 2, head_dim = 32, num_experts = 8, experts_per_token = 2,
                 expert_intermediate_size = 256, activation = "swiglu", router_score = "softmax", router = "topk"}

local CHARTS = {
  heatmap = function(c, a)
    charts.heatmap(c, {x = a.x, y = a.y, w = a.w, h = a.h, matrix = load_matrix, row_labels = rows,
      col_labels = cols, title = "Expert load by layer", xlabel = "expert", ylabel = "layer",
      colorbar_label = "share of tokens"})
  end,
  heatmap_diverging = function(c, a)
    local m = {}
    for i = 1, 8 do m[i] = {} for j = 1, 5 do m[i][j] = (i - 4.5) * (j - 3) / 4 end end
    charts.heatmap(c, {x = a.x, y = a.y, w = a.w, h = a.h, matrix = m, colormap = "diverging",
      annotate = true, title = "Specialisation", col_labels = {"arithmetic", "code", "records", "prose", "mixed"}})
  end,
  lines = function(c, a)
    charts.lines(c, {x = a.x, y = a.y, w = a.w, h = a.h, title = "Training loss", xlabel = "step",
      ylabel = "loss", log_y = true, series = {{name = "aux loss", xs = steps, ys = loss_a},
      {name = "aux-free (gap)", xs = steps, ys = loss_b}}})
  end,
  bars = function(c, a)
    local v1, v2 = {}, {}
    for e = 1, 16 do v1[e] = load_matrix[1][e]; v2[e] = load_matrix[6][e] end
    charts.bars(c, {x = a.x, y = a.y, w = a.w, h = a.h, categories = cols, title = "Tokens per expert",
      xlabel = "expert", ylabel = "share", series = {{name = "layer 1", values = v1}, {name = "layer 6", values = v2}},
      reference = 1 / 16, reference_label = "uniform 1/16"})
  end,
  sankey = function(c, a)
    charts.sankey(c, {x = a.x, y = a.y, w = a.w, h = a.h, title = "Expert paths",
      columns = {"layer 1", "layer 2", "layer 3"}, flows = flows, max_nodes = 6})
  end,
  architecture = function(c, a)
    charts.architecture(c, {x = a.x, y = a.y, w = a.w, h = a.h, config = mixtral,
      flops = {attention = 2.1e6, experts = 3.1e6, router = 2048, head = 6.5e4}})
  end,
}

local NAMES = {"heatmap", "heatmap_diverging", "lines", "bars", "sankey", "architecture"}

-- ---------------------------------------------------------------- specs

describe("moelab.viz", function()
  local dir
  setup(function() dir = tmpdir() end)
  teardown(function() if dir then os.execute("rm -rf '" .. dir .. "'") end end)

  it("is found on package.cpath from the moelab program", function()
    assert.is_truthy(package.cpath:find("/lib/?.so", 1, true))
    assert.is_function(viz.canvas)
    assert.is_true(viz.available)
    local cv, pv = viz.versions()
    assert.is_truthy(cv:match("^%d+%.%d+"))
    assert.is_truthy(pv:match("^%d+%.%d+"))
  end)

  it("says what to install when the C module is missing", function()
    local saved_cpath, saved = package.cpath, package.loaded["moelab.viz"]
    package.cpath = "/nonexistent/?.so"
    package.loaded["moelab.viz"] = nil
    local ok, err = pcall(require, "moelab.viz")
    package.cpath, package.loaded["moelab.viz"] = saved_cpath, saved
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find("moelab.viz needs cairo: install libcairo2-dev libpango1.0-dev and rebuild", 1, true))
  end)

  describe("charts", function()
    for _, name in ipairs(NAMES) do
      it(name .. " renders to PNG, PDF and SVG", function()
        local W, H = 520, name == "architecture" and 440 or 320
        for _, ext in ipairs{"png", "pdf", "svg"} do
          local path = dir .. "/" .. name .. "." .. ext
          assert.are.equal(path, charts.figure(path, {width = W, height = H, scale = 2, draw = CHARTS[name]}))
          if ext == "png" then
            local w, h = png_size(path)
            assert.are.equal(W * 2, w)
            assert.are.equal(H * 2, h)
            local st = viz.png_stats(path)
            assert.are.equal(W * 2, st.width)
            assert.are.equal(H * 2, st.height)
            assert.are.equal("#ffffffff", st.background)
            assert.is_true(st.distinct_colors > 20, name .. ": only " .. st.distinct_colors .. " colours")
            assert.is_true(st.drawn_fraction > 0.02 and st.drawn_fraction < 0.95,
              name .. ": drawn fraction " .. st.drawn_fraction)
          elseif ext == "pdf" then
            check_pdf(path, 1)
          else
            check_svg(read(path))
          end
        end
      end)
    end

    if not have_pdfinfo then pending("pdfinfo (poppler-utils) is missing: PDF page counts are not checked") end

    it("put several charts on the pages of one PDF", function()
      local path = dir .. "/report.pdf"
      local c = viz.canvas{path = path, width = 595, height = 842}
      local area = charts.page(c, {title = "Routing report", subtitle = "quickstart, step 400"})
      local cells = charts.grid(area, 2, 1)
      CHARTS.heatmap(c, cells[1])
      CHARTS.bars(c, cells[2])
      c:new_page()
      area = charts.page(c, {title = "Paths"})
      cells = charts.grid(area, 2, 1, 20)
      CHARTS.sankey(c, cells[1])
      CHARTS.lines(c, cells[2])
      c:new_page()
      CHARTS.architecture(c, charts.page(c, {title = "Model"}))
      assert.are.equal(3, c:pages())
      local p, n = c:finish()
      assert.are.equal(path, p)
      assert.are.equal(3, n)
      check_pdf(path, 3)
    end)

    it("handle gaps, log axes with non-positive values, and empty data", function()
      local path = dir .. "/gaps.png"
      charts.figure(path, {width = 400, height = 260, draw = function(c, a)
        local g = charts.grid(a, 1, 2)
        charts.lines(c, {x = g[1].x, y = g[1].y, w = g[1].w, h = g[1].h, log_y = true,
          series = {{name = "a", ys = {3, nil, 0, -1, 2, 1, 0 / 0, 4}}}})
        charts.lines(c, {x = g[2].x, y = g[2].y, w = g[2].w, h = g[2].h, series = {{name = "none", ys = {}}}})
      end})
      assert.is_true(viz.png_stats(path).drawn_fraction > 0.01)
    end)

    it("thin or rotate crowded labels (64 experts, long names)", function()
      local cats, v = {}, {}
      for e = 1, 64 do cats[e] = "expert number " .. e; v[e] = e % 7 end
      local path = dir .. "/crowded.png"
      charts.figure(path, {width = 420, height = 300, draw = function(c, a)
        charts.bars(c, {x = a.x, y = a.y, w = a.w, h = a.h, categories = cats, series = {{name = "n", values = v}}})
      end})
      assert.is_true(viz.png_stats(path).drawn_fraction > 0.05)
    end)

    it("take a model or its config for the architecture diagram", function()
      local m = moe.arch.DeepSeek{vocab_size = 64, hidden_size = 32, num_layers = 3, num_heads = 2, seed = 1}
      local s = viz.svg_string(420, 420, function(c)
        charts.architecture(c, {x = 0, y = 0, w = 420, h = 420, config = m})
      end)
      check_svg(s)
      local g = moe.arch.GLaM{vocab_size = 64, hidden_size = 32, num_layers = 4, num_heads = 2, seed = 1}
      check_svg(viz.svg_string(500, 400, function(c)
        charts.architecture(c, {x = 0, y = 0, w = 500, h = 400, config = g.config, title = "GLaM"})
      end))
    end)

    it("accept sankey flows as counted paths", function()
      local s = viz.svg_string(400, 300, function(c)
        charts.sankey(c, {x = 0, y = 0, w = 400, h = 300, columns = {"a", "b"},
          flows = {{path = {1, 2}, count = 10}, {path = {1, 3}, count = 5}, {path = {"x", 2}, count = 2}},
          node_label = function(id) return "node " .. tostring(id) end})
      end)
      check_svg(s)
    end)

    it("reject bad arguments with the chart and option named", function()
      local c = viz.canvas{path = dir .. "/bad.png", width = 300, height = 200}
      local a = {x = 0, y = 0, w = 300, h = 200}
      local function with(t) local r = {} for k, v in pairs(a) do r[k] = v end for k, v in pairs(t) do r[k] = v end return r end
      fails("charts.heatmap: argument 'c' must be a canvas", charts.heatmap, {}, with{matrix = {{1}}})
      fails("charts.heatmap: option 'matrix'", charts.heatmap, c, a)
      fails("charts.heatmap: matrix[1][2] must be a number", charts.heatmap, c, with{matrix = {{1, "x"}}})
      fails("charts.heatmap: option 'row_labels' must list 2 labels", charts.heatmap, c, with{matrix = {{1}, {2}}, row_labels = {"a"}})
      fails("charts.heatmap: option 'colormap'", charts.heatmap, c, with{matrix = {{1}}, colormap = "jet"})
      fails("charts.heatmap: unknown option 'colour'", charts.heatmap, c, with{matrix = {{1}}, colour = "x"})
      fails("charts.heatmap: option 'range'", charts.heatmap, c, with{matrix = {{1}}, range = {2, 1}})
      fails("charts.lines: option 'series'", charts.lines, c, a)
      fails("charts.lines: series[1].ys must be a list", charts.lines, c, with{series = {{name = "a", ys = 3}}})
      fails("charts.lines: series[1].ys[2] must be a number", charts.lines, c, with{series = {{ys = {1, "2"}}}})
      fails("charts.lines: option 'x' must be a finite number", charts.lines, c, with{x = 0 / 0, series = {{ys = {1}}}})
      fails("charts.lines: the area 50x200 is too small", charts.lines, c, with{w = 50, series = {{ys = {1}}}})
      fails("charts.bars: option 'categories'", charts.bars, c, with{series = {{values = {1}}}})
      fails("charts.bars: series[1].values has 3 entries for 2 categories", charts.bars, c,
        with{categories = {"a", "b"}, series = {{values = {1, 2, 3}}}})
      fails("charts.bars: option 'reference'", charts.bars, c, with{categories = {"a"}, series = {{values = {1}}}, reference = "x"})
      fails("charts.sankey: option 'columns'", charts.sankey, c, with{columns = {"a"}, flows = {{1}}})
      fails("charts.sankey: flows[1] has 3 steps for 2 columns", charts.sankey, c, with{columns = {"a", "b"}, flows = {{1, 2, 3}}})
      fails("charts.sankey: option 'max_nodes'", charts.sankey, c, with{columns = {"a", "b"}, flows = {{1, 2}}, max_nodes = 1})
      fails("charts.architecture: option 'config'", charts.architecture, c, with{h = 300, w = 300})
      fails("charts.architecture: config.hidden_size", charts.architecture, c, with{w = 300, h = 300, config = {hidden_size = -1}})
      fails("charts.legend: option 'items'", charts.legend, c, {x = 0, y = 0})
      fails("charts.figure: option 'draw'", charts.figure, dir .. "/f.png", {})
      fails("charts.figure: viz.canvas: option 'path'", charts.figure, dir .. "/f.gif", {draw = function() end})
      fails("charts.grid: argument 'rows'", charts.grid, a, 0, 1)
      c:finish()
      fails("charts.lines: the canvas is finished", charts.lines, c, with{series = {{ys = {1}}}})
    end)

    it("close the file when draw fails, and pass the error on", function()
      local path = dir .. "/fails.pdf"
      fails("boom", charts.figure, path, {draw = function() error("boom") end})
      assert.are.equal("%PDF", read(path):sub(1, 4))
    end)
  end)

  describe("axes and colours", function()
    it("choose round ticks and label them", function()
      assert.are.same({0, 0.02, 0.04, 0.06, 0.08, 0.1}, (charts.ticks(0, 0.1, 5)))
      local t, step = charts.ticks(0, 0.1, 4)
      assert.are.same({0, 0.025, 0.05, 0.075, 0.1}, t)
      assert.are.equal(0.025, step)
      assert.are.equal("0.025", charts.format_tick(0.025, step))
      assert.are.equal("0.050", charts.format_tick(0.05, step))
      assert.are.equal("20k", charts.format_tick(20000, 10000))
      assert.are.equal("1.5M", charts.format_tick(1.5e6, 5e5))
      assert.are.equal("10⁻⁵", charts.format_tick(1e-5))
      assert.are.equal("−2", charts.format_tick(-2, 1))
      assert.are.same({1, 10, 100, 1000}, charts.log_ticks(1, 1000, 6))
      assert.are.same({2, 3, 4, 5, 6}, charts.log_ticks(1.5, 6.5, 8))
    end)

    it("make a sequential map whose lightness falls monotonically", function()
      local last = 101
      for i = 0, 20 do
        local l = colors.rgb_to_lab(colors.sequential(i / 20))
        assert.is_true(l < last, "lightness rises at " .. i / 20)
        last = l
      end
      local l0 = colors.rgb_to_lab(colors.diverging(0))
      local lm = colors.rgb_to_lab(colors.diverging(0.5))
      local l1 = colors.rgb_to_lab(colors.diverging(1))
      assert.is_true(lm > l0 + 30 and lm > l1 + 30)
      local seen = {}
      for i = 1, 8 do
        local h = colors.categorical(i)
        assert.is_nil(seen[h])
        seen[h] = true
      end
      assert.are.equal(colors.categorical(1), colors.categorical(9))
      assert.are.equal("#ffffff", colors.text_on(colors.hex("#231c58")))
      assert.are.equal("#1a1a1a", colors.text_on(colors.hex("#fff7d4")))
      fails("colors.map: unknown colour map 'jet'", colors.map, "jet", 0.5)
    end)
  end)

  describe("canvas", function()
    it("writes PNG at scale, PDF and SVG, with shapes and text", function()
      for _, ext in ipairs{"png", "pdf", "svg"} do
        local path = dir .. "/shapes." .. ext
        local c = viz.canvas{path = path, width = 200, height = 100, scale = 3}
        assert.are.equal(ext, c:format())
        local w, h = c:size()
        assert.are.equal(200, w)
        assert.are.equal(100, h)
        c:color(0.2, 0.4, 0.6)
        c:rect(10, 10, 40, 30)
        c:rect(60, 10, 40, 30, {fill = false, stroke = true, line_width = 2, dash = {3, 2}, radius = 4})
        c:color("#d4542a")
        c:line(0, 90, 200, 90, {width = 1.5, dash = 4})
        c:polyline({10, 60, 50, 80, 90, 60}, {width = 2})
        c:polyline({110, 60, 150, 80, 190, 60}, {close = true, fill = true, color = {0, 0.5, 0.2, 0.5}})
        c:circle(160, 30, 12, {fill = false})
        c:curve(0, 0, 50, 100, 150, 0, 200, 100, {width = 0.5})
        c:ribbon(110, 10, 20, 150, 30, 40, {color = "#2c6fbb80"})
        c:clip(0, 0, 100, 50)
        c:color("#000000")
        c:text(50, 25, "Grüße ▲ μ 专家", {size = 12, align = "center", valign = "middle", bold = true})
        c:unclip()
        c:save_state()
        c:color(1, 0, 0, 0.5)
        c:text(190, 95, "rotated", {rotate = 90, align = "left", valign = "bottom", size = 9})
        c:restore_state()
        local tw, th, base = c:text_extent("Hello", {size = 10})
        assert.is_true(tw > 15 and tw < 40 and th > 8 and th < 20 and base > 0 and base < th)
        local tw2 = c:text_extent("Hello", {size = 20})
        assert.is_true(tw2 > 1.8 * tw)
        local _, th2 = c:text_extent("a long line that wraps", {size = 10, width = 40})
        assert.is_true(th2 > 2 * th)
        assert.is_truthy(tostring(c):find("viz.canvas(" .. ext:upper(), 1, true))
        c:finish()
        assert.is_true(c:is_finished())
        assert.is_truthy(tostring(c):find("finished", 1, true))
        if ext == "png" then
          local pw, ph = png_size(path)
          assert.are.equal(600, pw)
          assert.are.equal(300, ph)
          local st = viz.png_stats(path)
          assert.is_true(st.distinct_colors > 20 and st.drawn_fraction > 0.05)
        elseif ext == "pdf" then
          check_pdf(path, 1)
        else
          check_svg(read(path))
        end
      end
    end)

    it("gives PNG a white background, vector formats none unless asked", function()
      local c = viz.canvas{path = dir .. "/blank.png", width = 20, height = 10}
      c:finish()
      local st = viz.png_stats(dir .. "/blank.png")
      assert.are.equal(1, st.distinct_colors)
      assert.are.equal(0, st.drawn_fraction)
      assert.are.equal("#ffffffff", st.background)
      c = viz.canvas{path = dir .. "/clear.png", width = 20, height = 10, background = false}
      c:finish()
      assert.are.equal("#00000000", viz.png_stats(dir .. "/clear.png").background)
      c = viz.canvas{path = dir .. "/tinted.png", width = 20, height = 10, background = "#ff0000", scale = 1}
      c:finish()
      assert.are.equal("#ff0000ff", viz.png_stats(dir .. "/tinted.png").background)
    end)

    it("writes SVG pages after the first to <stem>-N.svg", function()
      local path = dir .. "/pages.svg"
      local c = viz.canvas{path = path, width = 100, height = 100}
      c:rect(0, 0, 10, 10)
      c:new_page()
      c:rect(20, 20, 10, 10)
      c:new_page()
      c:circle(50, 50, 10)
      local _, n = c:finish()
      assert.are.equal(3, n)
      check_svg(read(path))
      check_svg(read(dir .. "/pages-2.svg"))
      check_svg(read(dir .. "/pages-3.svg"))
    end)

    it("finishes itself when collected", function()
      local path = dir .. "/gc.png"
      do
        local c = viz.canvas{path = path, width = 30, height = 20, scale = 1}
        c:rect(0, 0, 10, 10, {color = "#000000"})
      end
      collectgarbage()
      collectgarbage()
      local w, h = png_size(path)
      assert.are.equal(30, w)
      assert.are.equal(20, h)
      assert.is_true(viz.png_stats(path).drawn_fraction > 0.1)
    end)

    it("renders SVG text for inline HTML", function()
      local s = viz.svg_string(120, 80, function(c)
        c:color("#2c6fbb")
        c:rect(10, 10, 50, 30)
        c:text(60, 60, "<&> escaped", {align = "center"})
      end)
      check_svg(s)
      assert.is_truthy(s:find('width="120', 1, true))
      assert.is_nil(s:find("<&>", 1, true))
      local kept
      fails("viz.svg_string: draw_fn failed: inner", viz.svg_string, 10, 10, function(c) kept = c; error("inner", 0) end)
      fails("canvas:rect: the canvas is finished", kept.rect, kept, 0, 0, 1, 1)
      fails("viz.svg_string: argument 'draw_fn' must be a function", viz.svg_string, 10, 10)
      fails("viz.svg_string: argument 'width' must be a number", viz.svg_string, "10", 10, function() end)
      fails("viz.svg_string: argument 'height' must be in", viz.svg_string, 10, 0, function() end)
      fails("canvas:new_page: an SVG stream", viz.svg_string, 10, 10, function(c) c:new_page() end)
    end)

    it("reports PNG statistics or a clear error", function()
      fails("viz.png_stats: argument 'path' must be a string", viz.png_stats, nil)
      fails("viz.png_stats: cannot read '" .. dir .. "/nope.png'", viz.png_stats, dir .. "/nope.png")
      local f = assert(io.open(dir .. "/fake.png", "wb"))
      f:write("not a png at all")
      f:close()
      fails("is not a readable PNG", viz.png_stats, dir .. "/fake.png")
    end)

    it("rejects bad arguments, naming the function and the argument", function()
      fails("viz.canvas: expected a table", viz.canvas, "x.png")
      fails("viz.canvas: option 'path' must be a file name", viz.canvas, {width = 10, height = 10})
      fails("viz.canvas: option 'path': cannot tell the format of 'x.jpg'", viz.canvas, {path = "x.jpg", width = 10, height = 10})
      fails("viz.canvas: option 'path': cannot tell the format", viz.canvas, {path = "dir.png/x", width = 10, height = 10})
      fails("viz.canvas: option 'width' is required", viz.canvas, {path = dir .. "/a.png", height = 10})
      fails("viz.canvas: option 'width' must be a number in", viz.canvas, {path = dir .. "/a.png", width = -5, height = 10})
      fails("viz.canvas: option 'height' must be a number,", viz.canvas, {path = dir .. "/a.png", width = 5, height = "10"})
      fails("viz.canvas: option 'scale'", viz.canvas, {path = dir .. "/a.png", width = 5, height = 5, scale = 0})
      fails("too large", viz.canvas, {path = dir .. "/a.png", width = 20000, height = 20000, scale = 2})
      fails("viz.canvas: unknown option 'widht'", viz.canvas, {path = dir .. "/a.png", widht = 5, height = 5})
      fails("viz.canvas: cannot write '/nonexistent/dir/a.pdf'", viz.canvas, {path = "/nonexistent/dir/a.pdf", width = 5, height = 5})
      fails("viz.canvas: argument 'opts.background'", viz.canvas, {path = dir .. "/a.png", width = 5, height = 5, background = "#12"})

      local c = viz.canvas{path = dir .. "/args.png", width = 50, height = 50}
      fails("canvas:color: argument 'g' must be a number", c.color, c, 1, "x", 0)
      fails("canvas:color: argument 'r' must be in 0..1", c.color, c, 2, 0, 0)
      fails("canvas:color: argument 'color': '#zzzzzz' is not a colour", c.color, c, "#zzzzzz")
      fails("canvas:color: argument 'color'[2] must be in 0..1", c.color, c, {0, 5, 0})
      fails("canvas:color: expected (r, g, b[, a])", c.color, c, nil)
      fails("canvas:rect: argument 'x' must be a number, got string", c.rect, c, "1", 0, 1, 1)
      fails("canvas:rect: argument 'h' must be finite", c.rect, c, 0, 0, 1, 1 / 0)
      fails("canvas:rect: argument 'opts' must be a table", c.rect, c, 0, 0, 1, 1, true)
      fails("canvas:rect: unknown option 'colour'", c.rect, c, 0, 0, 1, 1, {colour = "#000000"})
      fails("canvas:rect: option 'fill' must be a boolean", c.rect, c, 0, 0, 1, 1, {fill = 1})
      fails("canvas:rect: option 'line_width' must be a number in", c.rect, c, 0, 0, 1, 1, {line_width = -1})
      fails("canvas:line: option 'dash'[2] must be a positive length", c.line, c, 0, 0, 1, 1, {dash = {1, -1}})
      fails("canvas:line: option 'cap'", c.line, c, 0, 0, 1, 1, {cap = "pointy"})
      fails("canvas:polyline: argument 'points' must hold an even number", c.polyline, c, {1, 2, 3})
      fails("canvas:polyline: argument 'points'[3] must be a finite number", c.polyline, c, {1, 2, 0 / 0, 4})
      fails("canvas:polyline: argument 'points' must be a flat table", c.polyline, c, 5)
      fails("canvas:circle: argument 'r' must not be negative", c.circle, c, 1, 1, -1)
      fails("canvas:curve: argument 'c2y' must be a number", c.curve, c, 0, 0, 1, 1, 2, nil, 3, 3)
      fails("canvas:ribbon: argument 'y2b' must be a number", c.ribbon, c, 0, 0, 1, 5, 0)
      fails("canvas:ribbon: option 'curvature'", c.ribbon, c, 0, 0, 1, 5, 0, 1, {curvature = 2})
      fails("canvas:text: argument 's' must be a string", c.text, c, 0, 0, {})
      fails("canvas:text: argument 's' is not valid UTF-8", c.text, c, 0, 0, "bad \255 byte")
      fails("canvas:text: argument 's' contains a NUL byte", c.text, c, 0, 0, "a\0b")
      fails("canvas:text: option 'align' must be", c.text, c, 0, 0, "x", {align = "middle"})
      fails("canvas:text: option 'valign' must be", c.text, c, 0, 0, "x", {valign = "up"})
      fails("canvas:text: option 'size' must be a number in", c.text, c, 0, 0, "x", {size = 0})
      fails("canvas:text: argument 's' is not valid pango markup", c.text, c, 0, 0, "<b>x", {markup = true})
      fails("canvas:text_extent: option 'font' must be a string", c.text_extent, c, "x", {font = 3})
      fails("canvas:clip: arguments 'w' and 'h' must not be negative", c.clip, c, 0, 0, -1, 1)
      fails("canvas:unclip: no clip to remove", c.unclip, c)
      fails("canvas:restore_state: no save_state to restore", c.restore_state, c)
      c:save_state()
      c:clip(0, 0, 10, 10)
      fails("canvas:restore_state: a clip is open", c.restore_state, c)
      c:unclip()
      c:restore_state()
      fails("canvas:new_page: PNG holds one page", c.new_page, c)
      fails("canvas:rect: expected a canvas as self", c.rect, nil, 0, 0, 1, 1)
      fails("canvas:rect: expected a canvas as self", c.rect, {}, 0, 0, 1, 1)
      c:text(0, 10, 42)   -- numbers are text too
      c:finish()
      c:finish()          -- finishing again does nothing
      fails("canvas:rect: the canvas is finished", c.rect, c, 0, 0, 1, 1)
      fails("canvas:text: the canvas is finished", c.text, c, 0, 0, "x")
      fails("canvas:color: the canvas is finished", c.color, c, 0, 0, 0)
      fails("canvas:new_page: the canvas is finished", c.new_page, c)
      assert.is_true(png_size(dir .. "/args.png") == 100)
    end)

    it("survives deep nesting limits and large polylines", function()
      local c = viz.canvas{path = dir .. "/deep.pdf", width = 100, height = 100}
      for _ = 1, 64 do c:save_state() end
      fails("canvas:save_state: too many nested", c.save_state, c)
      for _ = 1, 64 do c:restore_state() end
      local pts = {}
      for i = 1, 20000 do pts[2 * i - 1] = i / 200; pts[2 * i] = 50 + 40 * math.sin(i / 100) end
      c:polyline(pts, {width = 0.5})
      c:finish()
      check_pdf(dir .. "/deep.pdf", 1)
    end)
  end)
end)
