--- moelab.report: routing reports of a training run (PDF, HTML, PNG).
--
--   local report = require "moelab.report"
--   report.build{run_dir = "runs/quickstart", save_to = "runs/quickstart/report.pdf"}
--   report.build{run_dir = "runs/x", save_to = {"x.pdf", "x.html", "x.png"}}   -- one analysis, three files
--   report.build{model = model, history = trainer.history, save_to = "r.html"}  -- no run directory
--   moelab report RUN_DIR [-o out.pdf|.html|.png] [--format pdf,html,png]     -- report.main(arg)
--
-- What it reads from a run directory: metrics.jsonl (one JSON object per
-- step: loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s, max_vio,
-- drop_rate, router_entropy, load = per-MoE-layer expert load fractions),
-- checkpoint/ (config.json, model.safetensors, trainer_state.json with the
-- evaluation points and the training options) or model/ (config.json +
-- model.safetensors). What it runs: the model in evaluation mode over a
-- held-out sample (default: num_samples sequences of a fresh built-in
-- corpus, generated with a seed the training corpus does not use, so every
-- token carries a domain label) through moe.RouterAnalyzer, and
-- moe.MoECostAnalyzer on the configuration.
--
-- Pages (the PDF; the HTML has the same figures as inline SVG, the PNG is
-- the first page):
--   1 overview      run summary, loss curve, expert load, top-1 flow, specialization
--   2 training      loss (train, EMA, eval), aux loss, z-loss, MaxVio, router entropy, tokens/s
--   3 expert load   layer x expert at the end of training; load over training per layer
--   4 routing flow  Sankey of each token's top-1 expert across the MoE layers
--   5 specialization  per layer, share of each domain's tokens per expert vs uniform k/E
--   6 co-activation per layer, N(Ei, Ej) / N(Ei) with the random baseline
--   7 affinity      domain and token class x expert, relative to uniform routing
--   8 locality      consecutive-token same-expert rate vs random routing
--   9 cost          parameters, FLOPs per token, memory, and the architecture diagram
-- A layer-by-layer page continues on further pages when there are more
-- than four MoE layers; a page whose inputs are missing (no checkpoint, no
-- metrics) is left out and the overview says why.
local mio = require "moelab.io"
local M = require "moelab.report_data"
local R = M._data
local floor, ceil, max, min, abs, PAGE_W, PAGE_H = R.floor, R.ceil, R.max, R.min, R.abs, R.PAGE_W, R.PAGE_H
local PER_PAGE, fail, finite, file_exists, si, count_str, bytes_str = R.PER_PAGE, R.fail, R.finite, R.file_exists, R.si, R.count_str, R.bytes_str
local html_escape, median, ema, downsample, hline, Progress, progress = R.html_escape, R.median, R.ema, R.downsample, R.hline, R.Progress, R.progress
local read_metrics, from_history, read_json, CLASSES, token_class, build_keys, final_load = R.read_metrics, R.from_history, R.read_json, R.CLASSES, R.token_class, R.build_keys, R.final_load
local nice_bin, load_over_time, expert_labels, layer_specialization, summary_rows = R.nice_bin, R.load_over_time, R.expert_labels, R.layer_specialization, R.summary_rows
local make_pages = require("moelab.report_pages").make_pages

-- ------------------------------------------------------------ rendering

local function need_viz()
  local ok, viz = pcall(require, "moelab.viz")
  if not ok then fail("%s", tostring(viz)) end
  local ch = viz.charts
  ch._colors = viz.colors
  return viz, ch
end

local function draw_page(ch, c, page, index, total, D)
  local area = ch.page(c, {title = page.title, subtitle = page.subtitle, margin = 30})
  area.h = area.h - 10                      -- room for the footer
  page.draw(ch, c, area)
  local T = ch.theme
  local W, H = c:size()
  c:line(30, H - 26, W - 30, H - 26, {width = 0.5, color = T.grid})
  c:text(30, H - 22, "moelab routing report · " .. D.name, {size = 9, color = T.muted, valign = "top"})
  if total > 1 then
    c:text(W - 30, H - 22, string.format("%d / %d", index, total), {size = 9, color = T.muted, valign = "top", align = "right"})
  end
end

local function render_pdf(D, pages, path)
  local viz, ch = need_viz()
  local c = viz.canvas{path = path, width = PAGE_W, height = PAGE_H}
  local ok, err = pcall(function()
    for i, p in ipairs(pages) do
      if i > 1 then c:new_page() end
      draw_page(ch, c, p, i, #pages, D)
    end
  end)
  if not ok then pcall(c.finish, c); error(err, 0) end
  c:finish()
end

local function render_png(D, pages, path, scale)
  scale = scale or D.png_scale
  local viz, ch = need_viz()
  local c = viz.canvas{path = path, width = PAGE_W, height = PAGE_H, scale = scale or 2}
  local ok, err = pcall(draw_page, ch, c, pages[1], 1, 1, D)
  if not ok then pcall(c.finish, c); error(err, 0) end
  c:finish()
end

-- An SVG document from cairo made fit to sit inline in HTML next to others:
-- no XML prolog, no namespace declarations (the HTML parser knows SVG and
-- xlink:href), and every id prefixed so that two figures' glyph and clip
-- definitions never collide.
local function inline_svg(svg, prefix)
  svg = svg:gsub("^%s*<%?xml[^>]*%?>%s*", "")
  svg = svg:gsub('%s+xmlns:xlink="[^"]*"', ""):gsub('%s+xmlns="[^"]*"', "")
  svg = svg:gsub('(%sid=")', "%1" .. prefix)
  svg = svg:gsub('(href=")#', "%1#" .. prefix)
  svg = svg:gsub("url%(#", "url(#" .. prefix)
  svg = svg:gsub('<svg%s+width="[^"]*"%s+height="[^"]*"', '<svg role="img" class="fig"', 1)
  return svg
end

local CSS = [[
:root { --fg: #1f1f1f; --muted: #595959; --rule: #e4e4e4; --accent: #2c6fbb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--fg); background: #f6f6f4; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 20px 60px; }
header h1 { font-size: 26px; margin: 8px 0 2px; }
header p { margin: 0; color: var(--muted); }
nav { margin: 16px 0 8px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
section { background: #fff; border: 1px solid var(--rule); border-radius: 6px; padding: 14px 18px 10px; margin: 18px 0; }
section h2 { font-size: 18px; margin: 0 0 2px; }
section p.sub { margin: 0 0 8px; color: var(--muted); font-size: 13px; }
svg.fig { display: block; width: 100%; height: auto; }
table.summary { border-collapse: collapse; font-size: 14px; }
table.summary th { text-align: left; font-weight: normal; color: var(--muted); padding: 2px 18px 2px 0; vertical-align: top; }
table.summary td { padding: 2px 0; }
ul.notes { color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
@media print { body { background: #fff; } section { break-inside: avoid; border: none; } nav { display: none; } }
]]

local function render_html(D, pages, path)
  local viz, ch = need_viz()
  local out = {}
  local function w(s) out[#out + 1] = s end
  local ov = pages[1]
  w("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
  w("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n")
  w("<title>" .. html_escape(ov.title) .. "</title>\n<style>" .. CSS .. "</style>\n</head>\n<body>\n<main>\n")
  w("<header><h1>" .. html_escape(ov.title) .. "</h1><p>" .. html_escape(ov.subtitle or "") .. "</p></header>\n")
  w("<nav>")
  w("<a href=\"#summary\">Summary</a>")
  for _, p in ipairs(pages) do w("<a href=\"#" .. p.id .. "\">" .. html_escape(p.id == "overview" and "Overview" or p.title) .. "</a>") end
  w("</nav>\n")
  w("<section id=\"summary\"><h2>Summary</h2>\n<table class=\"summary\">\n")
  for _, r in ipairs(summary_rows(D)) do
    w("<tr><th>" .. html_escape(r[1]) .. "</th><td>" .. html_escape(r[2]) .. "</td></tr>\n")
  end
  w("</table>\n")
  if #D.notes > 0 then
    w("<ul class=\"notes\">")
    for _, n in ipairs(D.notes) do w("<li>" .. html_escape(n) .. "</li>") end
    w("</ul>\n")
  end
  w("</section>\n")
  for i, p in ipairs(pages) do
    local svg = viz.svg_string(PAGE_W, PAGE_H, function(c)
      c:rect(0, 0, PAGE_W, PAGE_H, {color = "#ffffff"})
      local area = ch.page(c, {margin = 20})
      p.draw(ch, c, area)
    end)
    w(string.format("<section id=\"%s\"><h2>%s</h2>", p.id, html_escape(i == 1 and "Overview" or p.title)))
    if p.subtitle and i > 1 then w("<p class=\"sub\">" .. html_escape(p.subtitle) .. "</p>") end
    w("\n" .. inline_svg(svg, string.format("f%d-", i)) .. "\n</section>\n")
  end
  w("<footer>moelab routing report · generated " .. html_escape(os.date("%Y-%m-%d %H:%M")) .. "</footer>\n")
  w("</main>\n</body>\n</html>\n")
  mio.write_file_atomic(path, table.concat(out))
end

local function format_of(path)
  local ext = type(path) == "string" and path:match("%.([%w]+)$")
  ext = ext and ext:lower()
  if ext == "htm" then ext = "html" end
  if ext == "pdf" or ext == "html" or ext == "png" then return ext end
  return nil
end

--- render(D, path): writes the report collected in D to path (.pdf, .html, .png).
function M.render(D, path, P)
  local fmt = format_of(path)
  if not fmt then fail("save_to must end in .pdf, .html or .png, got %s", tostring(path)) end
  local dir = path:match("^(.*)/[^/]*$")
  if dir and dir ~= "" then mio.mkdir_p(dir) end
  local pages = D._pages or make_pages(D)
  D._pages = pages
  if fmt == "pdf" then render_pdf(D, pages, path)
  elseif fmt == "html" then render_html(D, pages, path)
  else render_png(D, pages, path) end
  if P then P:say("wrote %s (%s%s)", path, fmt:upper(), fmt == "pdf" and string.format(", %d pages", #pages) or "") end
  return path
end

--- build{run_dir=, save_to = "x.pdf" | "x.html" | "x.png" | {list}, dataset=, num_samples=32,
--   seq_len=, batch_size=8, seed=0, model=, history=, train_options=, title=, progress=true,
--   hardware_profile=}
-- -> the path written (or the list of paths when save_to is a list), and the collected data.
-- run_dir: a run directory (metrics.jsonl, checkpoint/ or model/); or model = a moe.MoEModel
-- with history = trainer.history (and train_options) for a model in memory.
function M.build(opts)
  if type(opts) ~= "table" then fail("expected a table {run_dir=, save_to=}, got %s", type(opts)) end
  for k in pairs(opts) do
    if not build_keys[k] then
      local names = {}
      for n in pairs(build_keys) do names[#names + 1] = n end
      table.sort(names)
      fail("unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
  if opts.run_dir == nil and opts.model == nil then fail("give run_dir = <run directory> or model = <moe.MoEModel>") end
  local targets = opts.save_to
  if targets == nil then
    if not opts.run_dir then fail("save_to is required without run_dir") end
    targets = opts.run_dir:gsub("/+$", "") .. "/report.pdf"
  end
  local list = type(targets) == "table" and targets or {targets}
  if #list == 0 then fail("save_to is an empty list") end
  for _, t in ipairs(list) do
    if not format_of(t) then fail("save_to must end in .pdf, .html or .png, got %s", tostring(t)) end
  end
  if opts.num_samples ~= nil and (type(opts.num_samples) ~= "number" or opts.num_samples < 1 or opts.num_samples % 1 ~= 0) then
    fail("num_samples must be a positive integer, got %s", tostring(opts.num_samples))
  end
  need_viz()
  local P = progress(opts.progress ~= false)
  local copt = {}
  for k, v in pairs(opts) do copt[k] = v end
  copt._progress = P
  local D = M.collect(copt)
  local written = {}
  for _, t in ipairs(list) do written[#written + 1] = M.render(D, t, P) end
  if type(targets) == "table" then return written, D end
  return written[1], D
end

-- ------------------------------------------------------------ command line

local USAGE = [[
usage: moelab report RUN_DIR [-o OUT] [--format pdf,html,png] [--samples N] [--quiet]

Writes a routing report of a training run: training curves, expert load,
top-1 routing flow, domain specialization, co-activation, token affinity,
routing locality, cost and the architecture. RUN_DIR holds metrics.jsonl and
checkpoint/ (or model/), as MoETrainer{run_dir = ...} writes them.

  -o OUT          output file; its extension (.pdf, .html, .png) picks the format
                  (default: RUN_DIR/report.pdf and RUN_DIR/report.html)
  --format LIST   formats to write, comma-separated, from pdf, html, png; with -o,
                  OUT's extension is replaced for each
  --samples N     held-out sequences the routing analyses run on (default 32)
  --quiet         no progress lines
  -h, --help      this help
]]

--- main(args): the `moelab report` subcommand; args is the program's `arg`
-- (args[1] = RUN_DIR, ...). Returns the exit status (0, 1 on failure, 2 on a usage error).
function M.main(args)
  args = args or {}
  local run_dir, out, formats, samples, quiet
  local i = 1
  local function usage_error(msg)
    io.stderr:write("moelab report: ", msg, "\n", USAGE)
    return 2
  end
  while args[i] ~= nil do
    local a = args[i]
    if a == "-h" or a == "--help" then io.write(USAGE); return 0
    elseif a == "-o" or a == "--output" then
      out = args[i + 1]; i = i + 1
      if not out then return usage_error("-o needs a file name") end
    elseif a:match("^%-%-output=") then out = a:sub(10)
    elseif a == "--format" then
      formats = args[i + 1]; i = i + 1
      if not formats then return usage_error("--format needs a list such as pdf,html") end
    elseif a:match("^%-%-format=") then formats = a:sub(10)
    elseif a == "--samples" then
      samples = tonumber(args[i + 1]); i = i + 1
      if not samples or samples < 1 or samples % 1 ~= 0 then return usage_error("--samples needs a positive integer") end
    elseif a == "--quiet" or a == "-q" then quiet = true
    elseif a:sub(1, 1) == "-" and a ~= "-" then return usage_error("unknown option '" .. a .. "'")
    elseif run_dir then return usage_error("one RUN_DIR only (got '" .. run_dir .. "' and '" .. a .. "')")
    else run_dir = a end
    i = i + 1
  end
  if not run_dir then return usage_error("RUN_DIR is missing") end
  local fmts = {}
  if formats then
    for f in formats:gmatch("[^,%s]+") do
      f = f:lower()
      if f == "htm" then f = "html" end
      if f ~= "pdf" and f ~= "html" and f ~= "png" then return usage_error("unknown format '" .. f .. "' (pdf, html, png)") end
      fmts[#fmts + 1] = f
    end
    if #fmts == 0 then return usage_error("--format lists no format") end
  end
  local targets = {}
  local base = run_dir:gsub("/+$", "") .. "/report"
  if out then
    local f = format_of(out)
    if #fmts == 0 then
      if not f then return usage_error("cannot tell the format of '" .. out .. "' (use .pdf, .html or .png)") end
      targets[1] = out
    else
      local stem = f and out:gsub("%.[%w]+$", "") or out
      for _, x in ipairs(fmts) do targets[#targets + 1] = stem .. "." .. x end
    end
  else
    if #fmts == 0 then fmts = {"pdf", "html"} end
    for _, x in ipairs(fmts) do targets[#targets + 1] = base .. "." .. x end
  end
  local ok, res = pcall(M.build, {run_dir = run_dir, save_to = targets, num_samples = samples, progress = not quiet})
  if not ok then
    io.stderr:write("moelab ", tostring(res), "\n")
    return 1
  end
  for _, p in ipairs(res) do print(p) end
  return 0
end

return M
