--- moe.RouterAnalyzer: what the router does with which tokens.
--
--   local an = moe.RouterAnalyzer(model)
--   local r = an:analyze_batch(ids)                       -- per token and layer: experts, weights
--   local spec = an:compute_expert_specialization{dataset = ds, num_samples = 64}
--   local co = an:co_activation{dataset = ds}             -- N(Ei, Ej) / N(Ei) per layer
--   local cons = an:consecutive_rate{dataset = ds}        -- same expert at the next token?
--   local sat = an:router_saturation("runs/x/checkpoint", ds)   -- agreement with another checkpoint
--   local aff = an:affinity{tokens = {"def", "the", "+"}, context = some_text}
--   an:write_traces("runs/x/traces.jsonl", ds, {num_sequences = 32, seq_len = 256})
--   local tr = moe.RouterAnalyzer.read_traces("runs/x/traces.jsonl")
--
-- Every analysis runs the model in evaluation mode (no noise, no jitter),
-- restores its training flag, and reads the routing each MoE layer kept from
-- its forward (layer:assignments()). Token batches come from either
-- ids = <i64 tensor [B, S]> or dataset = <dataset> with num_samples
-- (sequences, default 64), batch_size (8), seq_len (128) and seed (0): the
-- dataset's deterministic random windows, which carry domain labels.
--
-- Conventions: expert ids and token ids are 0-based; per-expert lists hold
-- expert e at index e + 1; MoE layers are numbered 1..L in the Lua results
-- (0-based in trace files, see write_traces); a token's experts are ordered
-- by weight, largest first. Assignments dropped by a capacity limit are not
-- part of a token's choices.
local U = require "moelab.analytics.util"
local baselines = require "moelab.analytics.baselines"
local traces = require "moelab.analytics.traces"

local M = {}
local Analyzer = {}
Analyzer.__index = Analyzer
Analyzer.__tostring = function(self)
  return string.format("RouterAnalyzer(%d MoE layers, %d experts, top-%d)", #self.layers, self.num_experts,
    self.top_k)
end

local function check_self(fname, self)
  if getmetatable(self) ~= Analyzer then error(fname .. ": call it on a RouterAnalyzer with ':'", 3) end
end

-- The constructor: moe.RouterAnalyzer(model).
local function new_analyzer(model)
  local f = "RouterAnalyzer"
  local r = U.resolve(f, model, true)
  local self = setmetatable({model = r.model, net = r.net, layers = r.layers, config = r.config}, Analyzer)
  self.num_experts = r.config.num_experts or U.num_experts(r.layers[1])
  self.top_k = r.config.experts_per_token or 1
  return self
end

-- One evaluation forward over ids [B, S]: the per-layer routing regrouped
-- per token, and (when asked) the argmax prediction at each position.
function Analyzer:_route(ids, want_pred)
  local v, b, s = U.check_ids("RouterAnalyzer", ids)
  local logits = U.eval_forward(self.net, v)
  local out = {batch_size = b, seq_len = s, ids = U.flat(ids), layers = {}}
  if want_pred then out.predicted = U.flat(logits:argmax()) end
  logits:free()
  for l, layer in ipairs(self.layers) do
    local ex, w = U.per_token(layer, b * s)
    out.layers[l] = {experts = ex, weights = w}
  end
  return out
end

local analyze_keys = {predictions = true}

--- analyze_batch(ids[, {predictions = false}]) -> {batch_size=, seq_len=,
-- num_layers=, num_experts=, top_k=, ids = {...}, predicted = {...},
-- layers = {[l] = {experts = {[n] = {e, ...}}, weights = {[n] = {w, ...}}}}}
-- ids: i64 [B, S] (or [S]). Token n = (b - 1) * S + s for the 1-based batch
-- row b and position s; ids[n] is its token id, layers[l].experts[n] the
-- experts layer l sent it to (0-based, largest weight first) and
-- layers[l].weights[n] their combine weights. predicted[n] (with
-- predictions = true) is the argmax of the logits at that position.
function Analyzer:analyze_batch(ids, opts)
  local f = "RouterAnalyzer:analyze_batch"
  check_self(f, self)
  U.check_ids(f, ids)
  opts = U.check_opts(f, opts, analyze_keys)
  local r = self:_route(ids, opts.predictions)
  r.num_layers, r.num_experts, r.top_k = #self.layers, self.num_experts, self.top_k
  return r
end

-- The text of a token id: a tokenizer's decode, else the byte for byte-level ids.
local function token_text(tok, id, byte_level)
  if tok then
    local ok, s = pcall(tok.decode, tok, {id})
    if ok then return s end
  end
  if byte_level and id >= 0 and id < 256 then return string.char(id) end
  return nil
end

local function top_tokens(counts, totals, expert_total, n, min_count, rank_by, tok, byte_level)
  local list = {}
  for id, c in pairs(counts) do
    if c >= min_count then
      list[#list + 1] = {id = id, count = c, share = c / expert_total, affinity = c / totals[id]}
    end
  end
  local key = rank_by
  table.sort(list, function(a, b)
    if a[key] ~= b[key] then return a[key] > b[key] end
    if a.count ~= b.count then return a.count > b.count end
    return a.id < b.id
  end)
  local out = {}
  for i = 1, math.min(n, #list) do
    list[i].text = token_text(tok, list[i].id, byte_level)
    out[i] = list[i]
  end
  return out
end

local spec_keys = {top_tokens = true, rank_by = true, min_count = true, tokenizer = true, domains = true,
                   domain_names = true}
for k in pairs(U.source_keys) do spec_keys[k] = true end

--- compute_expert_specialization{dataset= | ids= [, domains=, domain_names=], num_samples=64,
--   batch_size=8, seq_len=128, seed=0, top_tokens=10, rank_by="share"|"affinity",
--   min_count=1, tokenizer=}
-- Domain specialization, per MoE layer l, domain d and expert e:
--   share(d, e) = N(d, e) / T(d), N(d, e) the tokens of domain d routed to e,
--   T(d) the tokens of domain d. A token has k experts, so sum_e share = k
--   (less drops) and uniform routing gives share = k/E (the baseline);
--   specialization(d, e) = share(d, e) / (k/E), 1 = no preference.
-- Domain labels come from the dataset's batches (ds:batch's third result),
-- or with ids from domains = <i64 tensor like ids> and domain_names.
-- Vocabulary specialization, per expert e and token v (input token, or the
-- model's argmax prediction at that position):
--   share = N(e, v) / N(e)     the part of the expert's traffic that is v
--   affinity = N(e, v) / N(v)  the part of v's occurrences sent to e (k/E uniform)
-- listing the top_tokens tokens by rank_by among those seen >= min_count times.
-- Returns {domains = {names}, tokens = N, baseline = k/E, layers = {[l] = {
--   domains = {[name] = {tokens=, counts = {N(d, e)}, share = {...}, specialization = {...}, top_expert=}},
--   experts = {[e+1] = {tokens=, domain_share = {[name] = fraction of e's tokens},
--     dominant_domain=, input_tokens = {{id=, text=, count=, share=, affinity=}, ...},
--     predicted_tokens = {...}}}}}}
function Analyzer:compute_expert_specialization(opts)
  local f = "RouterAnalyzer:compute_expert_specialization"
  check_self(f, self)
  if type(opts) ~= "table" then U.fail(f, "expected a table of options, got %s", type(opts)) end
  U.check_opts(f, opts, spec_keys)
  local ntop = U.opt_int(f, opts, "top_tokens", 10, 0)
  local min_count = U.opt_int(f, opts, "min_count", 1, 1)
  local rank_by = opts.rank_by or "share"
  if rank_by ~= "share" and rank_by ~= "affinity" then
    U.fail(f, "option 'rank_by' must be \"share\" or \"affinity\", got %s", U.describe(rank_by))
  end
  local names
  if opts.dataset ~= nil and U.is_dataset(opts.dataset) then
    names = opts.dataset:domains()
  else
    names = opts.domain_names or {}
    if type(names) ~= "table" then U.fail(f, "option 'domain_names' must be a list of strings") end
  end
  if opts.domains ~= nil and opts.ids == nil then U.fail(f, "option 'domains' goes with option 'ids'") end
  local ext_domains = opts.domains and U.flat(U.check_ids(f, opts.domains, "option 'domains'"))
  local byte_level = opts.dataset == nil or (U.is_dataset(opts.dataset) and opts.dataset:is_byte_level())
  local E, L = self.num_experts, #self.layers
  local k = self.top_k
  local acc = {}
  for l = 1, L do
    local a = {dom = {}, dom_tokens = {}, expert_tokens = U.filled(E, 0), in_cnt = {}, pred_cnt = {}}
    for e = 1, E do a.in_cnt[e], a.pred_cnt[e] = {}, {} end
    acc[l] = a
  end
  local in_total, pred_total, ntok = {}, {}, 0
  local function dname(d)
    if d == nil or d < 0 then return nil end
    return names[d + 1] or ("domain " .. d)
  end
  U.each_batch(f, opts, function(ids, domains)
    local r = self:_route(ids, true)
    local dl = domains and U.flat(domains) or ext_domains
    if dl and #dl ~= #r.ids then U.fail(f, "option 'domains' must have the shape of ids") end
    for n = 1, #r.ids do
      local v, p = r.ids[n], r.predicted[n]
      in_total[v] = (in_total[v] or 0) + 1
      pred_total[p] = (pred_total[p] or 0) + 1
    end
    ntok = ntok + #r.ids
    for l = 1, L do
      local a, ex = acc[l], r.layers[l].experts
      for n = 1, #r.ids do
        local d = dl and dname(dl[n])
        local row
        if d then
          row = a.dom[d]
          if not row then row = U.filled(E, 0); a.dom[d] = row; a.dom_tokens[d] = 0 end
          a.dom_tokens[d] = a.dom_tokens[d] + 1
        end
        local v, p = r.ids[n], r.predicted[n]
        for _, e in ipairs(ex[n]) do
          local j = e + 1
          a.expert_tokens[j] = a.expert_tokens[j] + 1
          if row then row[j] = row[j] + 1 end
          a.in_cnt[j][v] = (a.in_cnt[j][v] or 0) + 1
          a.pred_cnt[j][p] = (a.pred_cnt[j][p] or 0) + 1
        end
      end
    end
  end)
  local base = baselines.specialization(E, k)
  local out = {domains = names, tokens = ntok, baseline = base, num_experts = E, top_k = k, layers = {}}
  for l = 1, L do
    local a = acc[l]
    local lay = {domains = {}, experts = {}}
    for d, row in pairs(a.dom) do
      local t = a.dom_tokens[d]
      local share, spec, best = {}, {}, 1
      for j = 1, E do
        share[j] = row[j] / t
        spec[j] = share[j] / base
        if row[j] > row[best] then best = j end
      end
      lay.domains[d] = {tokens = t, counts = row, share = share, specialization = spec, top_expert = best - 1}
    end
    for j = 1, E do
      local nt = a.expert_tokens[j]
      local ds, dom, dom_v = {}, nil, -1
      for d, row in pairs(a.dom) do
        ds[d] = nt > 0 and row[j] / nt or 0
        if row[j] > dom_v or (row[j] == dom_v and d < dom) then dom, dom_v = d, row[j] end
      end
      lay.experts[j] = {
        expert = j - 1, tokens = nt, domain_share = ds, dominant_domain = nt > 0 and dom or nil,
        input_tokens = nt > 0 and top_tokens(a.in_cnt[j], in_total, nt, ntop, min_count, rank_by, opts.tokenizer,
          byte_level) or {},
        predicted_tokens = nt > 0 and top_tokens(a.pred_cnt[j], pred_total, nt, ntop, min_count, rank_by,
          opts.tokenizer, byte_level) or {},
      }
    end
    out.layers[l] = lay
  end
  return out
end

local source_only = {}
for k in pairs(U.source_keys) do source_only[k] = true end

--- co_activation{dataset= | ids=, num_samples=, batch_size=, seq_len=, seed=}
-- Over all pairs of a token's chosen experts, per MoE layer:
--   counts[i+1][j+1] = N(Ei, Ej), tokens sent to both i and j (diagonal: N(Ei));
--   matrix[i+1][j+1] = N(Ei, Ej) / N(Ei), the share of expert i's tokens that
--   expert j also gets (diagonal 1; a row of an unused expert is 0).
-- Random top-k routing gives (k - 1)/(E - 1) off the diagonal (baseline).
-- Returns {layers = {[l] = {counts=, matrix=}}, baseline=, tokens=}.
function Analyzer:co_activation(opts)
  local f = "RouterAnalyzer:co_activation"
  check_self(f, self)
  if type(opts) ~= "table" then U.fail(f, "expected a table of options, got %s", type(opts)) end
  U.check_opts(f, opts, source_only)
  local E, L = self.num_experts, #self.layers
  local counts = {}
  for l = 1, L do
    counts[l] = {}
    for i = 1, E do counts[l][i] = U.filled(E, 0) end
  end
  local ntok = 0
  U.each_batch(f, opts, function(ids)
    local r = self:_route(ids, false)
    ntok = ntok + #r.ids
    for l = 1, L do
      local c = counts[l]
      for _, ex in ipairs(r.layers[l].experts) do
        for a = 1, #ex do
          local row = c[ex[a] + 1]
          for b = 1, #ex do row[ex[b] + 1] = row[ex[b] + 1] + 1 end
        end
      end
    end
  end)
  local out = {layers = {}, baseline = baselines.co_activation(E, self.top_k), tokens = ntok}
  for l = 1, L do
    local m = {}
    for i = 1, E do
      m[i] = {}
      local ni = counts[l][i][i]
      for j = 1, E do m[i][j] = ni > 0 and counts[l][i][j] / ni or 0 end
    end
    out.layers[l] = {counts = counts[l], matrix = m}
  end
  return out
end

--- consecutive_rate{dataset= | ids=, ...}: how often a token's experts
-- repeat at the next token of the same sequence, per MoE layer:
--   topk = mean over adjacent pairs of |S_t ∩ S_t+1| / k (k the router's top-k)
--   top1 = share of adjacent pairs whose top-1 (largest-weight) expert is the same
-- with the random baselines {topk = k/E, top1 = 1/E}.
-- Returns {layers = {[l] = {topk=, top1=, pairs=}}, topk=, top1= (means over
-- layers), baseline = {topk=, top1=}}.
function Analyzer:consecutive_rate(opts)
  local f = "RouterAnalyzer:consecutive_rate"
  check_self(f, self)
  if type(opts) ~= "table" then U.fail(f, "expected a table of options, got %s", type(opts)) end
  U.check_opts(f, opts, source_only)
  local L, k = #self.layers, self.top_k
  local acc = {}
  for l = 1, L do acc[l] = {overlap = 0, same1 = 0, pairs = 0} end
  U.each_batch(f, opts, function(ids)
    local r = self:_route(ids, false)
    local S = r.seq_len
    for l = 1, L do
      local a, ex = acc[l], r.layers[l].experts
      for b = 0, r.batch_size - 1 do
        for s = 1, S - 1 do
          local x, y = ex[b * S + s], ex[b * S + s + 1]
          local inter = 0
          for _, e in ipairs(x) do
            for _, g in ipairs(y) do if e == g then inter = inter + 1; break end end
          end
          a.overlap = a.overlap + inter / k
          if x[1] ~= nil and x[1] == y[1] then a.same1 = a.same1 + 1 end
          a.pairs = a.pairs + 1
        end
      end
    end
  end)
  local out = {layers = {}, baseline = baselines.consecutive(self.num_experts, k)}
  local tk, t1 = {}, {}
  for l = 1, L do
    local a = acc[l]
    local p = math.max(a.pairs, 1)
    out.layers[l] = {topk = a.overlap / p, top1 = a.same1 / p, pairs = a.pairs}
    tk[l], t1[l] = out.layers[l].topk, out.layers[l].top1
  end
  out.topk, out.top1 = U.mean(tk), U.mean(t1)
  return out
end

--- router_saturation(other, dataset[, opts]): agreement between this model's
-- routing and another checkpoint's on the same tokens (OLMoE's "router
-- saturation": how much of the final routing an earlier checkpoint has).
-- other: a moe.MoEModel, nn.Model or a directory moe.load reads. dataset
-- may be nil when opts.ids is given; opts are the sampling options.
-- Per MoE layer:
--   topk = mean over tokens of |S_this ∩ S_other| / max(|S_this|, |S_other|)
--   top1 = share of tokens whose top-1 expert is the same
-- The same model twice gives 1; unrelated routers give {topk = k/E, top1 = 1/E}.
-- Returns {layers = {[l] = {topk=, top1=}}, topk=, top1=, baseline = {...}, tokens=}.
function Analyzer:router_saturation(other, dataset, opts)
  local f = "RouterAnalyzer:router_saturation"
  check_self(f, self)
  if type(other) == "string" then
    local ok, m = pcall(require("moelab.checkpoint").load, other)
    if not ok then U.fail(f, "other: cannot load checkpoint %s: %s", other, tostring(m)) end
    other = m
  end
  if not (U.is_model(other) or U.is_net(other)) then
    U.fail(f, "other must be a moe.MoEModel, an nn.Model or a checkpoint directory, got %s", type(other))
  end
  local theirs = new_analyzer(other)
  if #theirs.layers ~= #self.layers or theirs.num_experts ~= self.num_experts then
    U.fail(f, "other has %d MoE layers of %d experts, this model %d of %d", #theirs.layers, theirs.num_experts,
      #self.layers, self.num_experts)
  end
  opts = U.check_opts(f, opts, source_only)
  local src = {}
  for key, v in pairs(opts) do src[key] = v end
  if dataset ~= nil then
    if not U.is_dataset(dataset) then U.fail(f, "dataset must be a dataset (or nil with opts.ids), got %s", type(dataset)) end
    src.dataset = dataset
  end
  local L = #self.layers
  local acc = {}
  for l = 1, L do acc[l] = {topk = 0, top1 = 0} end
  local ntok = 0
  U.each_batch(f, src, function(ids)
    local a, b = self:_route(ids, false), theirs:_route(ids, false)
    ntok = ntok + #a.ids
    for l = 1, L do
      local ea, eb = a.layers[l].experts, b.layers[l].experts
      for n = 1, #a.ids do
        local x, y = ea[n], eb[n]
        local inter = 0
        for _, e in ipairs(x) do
          for _, g in ipairs(y) do if e == g then inter = inter + 1; break end end
        end
        local size = math.max(#x, #y)
        acc[l].topk = acc[l].topk + (size > 0 and inter / size or 1)
        if x[1] == y[1] then acc[l].top1 = acc[l].top1 + 1 end
      end
    end
  end)
  local out = {layers = {}, tokens = ntok, baseline = baselines.saturation(self.num_experts, self.top_k)}
  local tk, t1 = {}, {}
  for l = 1, L do
    out.layers[l] = {topk = acc[l].topk / math.max(ntok, 1), top1 = acc[l].top1 / math.max(ntok, 1)}
    tk[l], t1[l] = out.layers[l].topk, out.layers[l].top1
  end
  out.topk, out.top1 = U.mean(tk), U.mean(t1)
  return out
end

-- Token ids of a string: a tokenizer's encode, else the byte-level encoding.
local function encode(f, tok, s)
  local ids
  if tok then
    local ok, r = pcall(tok.encode, tok, s)
    if not ok then U.fail(f, "tokenizer:encode failed on %q: %s", s, tostring(r)) end
    ids = r
  else
    ids = require("moelab.data").encode(s)
  end
  if type(ids) == "table" then return ids end
  return U.flat(ids)
end

local affinity_keys = {tokens = true, context = true, tokenizer = true}

--- affinity{tokens = {"def", "the", "+"}[, context = text][, tokenizer = tok]}
-- -> {[string] = {occurrences=, positions=, layers = {[l] = {share = {[e+1]}, top_expert=}}}}, baseline
-- Which experts each string's tokens go to. Strings are encoded with the
-- tokenizer (anything with :encode(s) returning ids) or byte-level. Without
-- context each string runs alone as one sequence and its tokens are
-- averaged; with context the context runs once and the average is over
-- every token of every occurrence of the string's ids in the context
-- (occurrences = 0 and all-zero shares when it never occurs; the context
-- runs as one sequence, so keep it within what the model handles). share[e+1] is
-- the fraction of those tokens routed to expert e; uniform routing gives
-- k/E, returned as the second value.
function Analyzer:affinity(opts)
  local f = "RouterAnalyzer:affinity"
  check_self(f, self)
  if type(opts) ~= "table" then U.fail(f, "expected a table of options, got %s", type(opts)) end
  U.check_opts(f, opts, affinity_keys)
  if type(opts.tokens) ~= "table" or #opts.tokens == 0 then
    U.fail(f, "option 'tokens' must be a non-empty list of strings")
  end
  for i, s in ipairs(opts.tokens) do
    if type(s) ~= "string" or s == "" then U.fail(f, "tokens[%d] must be a non-empty string, got %s", i, U.describe(s)) end
  end
  if opts.context ~= nil and (type(opts.context) ~= "string" or opts.context == "") then
    U.fail(f, "option 'context' must be a non-empty string, got %s", U.describe(opts.context))
  end
  local tok = opts.tokenizer
  if tok ~= nil and (type(tok) ~= "table" and type(tok) ~= "userdata") then
    U.fail(f, "option 'tokenizer' must have an encode method, got %s", type(tok))
  end
  local E, L = self.num_experts, #self.layers
  local core = require "moelab.core"
  local function to_tensor(list)
    local rows = {}
    for i, v in ipairs(list) do rows[i] = v end
    return core.tensor({rows}, {dtype = "i64"})
  end
  local ctx_ids, ctx_route
  if opts.context then
    ctx_ids = encode(f, tok, opts.context)
    ctx_route = self:_route(to_tensor(ctx_ids), false)
  end
  local out = {}
  for _, s in ipairs(opts.tokens) do
    local ids = encode(f, tok, s)
    local positions, route, occ = {}, nil, 0
    if ctx_route then
      route = ctx_route
      local m = #ids
      for i = 1, #ctx_ids - m + 1 do
        local hit = true
        for j = 1, m do if ctx_ids[i + j - 1] ~= ids[j] then hit = false; break end end
        if hit then
          occ = occ + 1
          for j = 1, m do positions[#positions + 1] = i + j - 1 end
        end
      end
    else
      route = self:_route(to_tensor(ids), false)
      occ = 1
      for i = 1, #ids do positions[i] = i end
    end
    local entry = {occurrences = occ, positions = #positions, layers = {}}
    for l = 1, L do
      local share = U.filled(E, 0)
      local ex = route.layers[l].experts
      for _, n in ipairs(positions) do
        for _, e in ipairs(ex[n]) do share[e + 1] = share[e + 1] + 1 end
      end
      local best = 1
      for j = 1, E do
        if #positions > 0 then share[j] = share[j] / #positions end
        if share[j] > share[best] then best = j end
      end
      entry.layers[l] = {share = share, top_expert = #positions > 0 and best - 1 or nil}
    end
    out[s] = entry
  end
  return out, baselines.specialization(E, self.top_k)
end

local plot_keys = {tokens = true, save_to = true, context = true, tokenizer = true, layers = true, title = true}

--- plot_expert_token_affinity{tokens = {...}, save_to = "x.png"|"x.pdf"|"x.svg"[, layers = {1, 2}]
--   [, context =, tokenizer =, title =]} -> save_to
-- One heatmap per MoE layer (all layers, at most 4 unless layers= picks
-- them): rows are the strings, columns the experts, cells the share of the
-- string's tokens routed to each expert (from affinity{}); the colour scale
-- is centred on the uniform share k/E.
function Analyzer:plot_expert_token_affinity(opts)
  local f = "RouterAnalyzer:plot_expert_token_affinity"
  check_self(f, self)
  if type(opts) ~= "table" then U.fail(f, "expected a table of options, got %s", type(opts)) end
  U.check_opts(f, opts, plot_keys)
  if type(opts.save_to) ~= "string" or not opts.save_to:match("%.[%a]+$") then
    U.fail(f, "option 'save_to' must be a .png, .pdf or .svg path, got %s", U.describe(opts.save_to))
  end
  local L = #self.layers
  local layers = opts.layers
  if layers == nil then
    layers = {}
    for l = 1, math.min(L, 4) do layers[l] = l end
  elseif type(layers) ~= "table" or #layers == 0 then
    U.fail(f, "option 'layers' must be a non-empty list of MoE layer numbers (1..%d)", L)
  end
  for i, l in ipairs(layers) do
    if type(l) ~= "number" or l < 1 or l > L or l % 1 ~= 0 then
      U.fail(f, "layers[%d] must be an MoE layer number in 1..%d, got %s", i, L, U.describe(l))
    end
  end
  local aff, uniform = self:affinity{tokens = opts.tokens, context = opts.context, tokenizer = opts.tokenizer}
  local charts = require("moelab.viz").charts
  local cols = math.min(#layers, 2)
  local rows = math.ceil(#layers / cols)
  local col_labels = {}
  for e = 1, self.num_experts do col_labels[e] = "E" .. (e - 1) end
  local row_labels = {}
  local escapes = {["\n"] = "\\n", ["\t"] = "\\t", ["\r"] = "\\r"}
  for i, s in ipairs(opts.tokens) do row_labels[i] = '"' .. s:gsub("[\n\t\r]", escapes) .. '"' end
  return charts.figure(opts.save_to, {
    width = 420 * cols, height = 60 + rows * (80 + 18 * #opts.tokens),
    title = opts.title or "Token-expert affinity",
    subtitle = string.format("share of each string's tokens per expert; uniform routing gives %.3f", uniform),
    draw = function(c, area)
      for i, a in ipairs(charts.grid(area, rows, cols, 24)) do
        local l = layers[i]
        if not l then break end
        local matrix = {}
        for r, s in ipairs(opts.tokens) do matrix[r] = aff[s].layers[l].share end
        charts.heatmap(c, {x = a.x, y = a.y, w = a.w, h = a.h, matrix = matrix, row_labels = row_labels,
                           col_labels = col_labels, title = "MoE layer " .. l, xlabel = "expert",
                           colormap = "diverging", center = uniform, range = {0, 1}, colorbar = i == #layers})
      end
    end,
  })
end

local trace_keys = {num_sequences = true, seq_len = true, batch_size = true, first = true, format = true,
                    weights = true}

--- write_traces(path, dataset[, {num_sequences=16, seq_len=128, batch_size=8, first=0,
--   format="jsonl"|"tsv", weights=true}]) -> number of records
-- Runs consecutive windows first .. first + num_sequences - 1 of the dataset
-- (ds:window_batch: the dataset's text in order) and writes one record per
-- (sequence, position, MoE layer): the format is documented in
-- moelab/analytics/traces.lua. format defaults to "tsv" for a path ending
-- in .tsv, else "jsonl". The file is written to path.tmp and renamed.
function Analyzer:write_traces(path, ds, opts)
  local f = "RouterAnalyzer:write_traces"
  check_self(f, self)
  if type(path) ~= "string" or path == "" then U.fail(f, "path must be a file path string, got %s", U.describe(path)) end
  if not U.is_dataset(ds) then U.fail(f, "dataset must be a dataset, got %s", type(ds)) end
  opts = U.check_opts(f, opts, trace_keys)
  local nseq = U.opt_int(f, opts, "num_sequences", 16, 1)
  local sl = U.opt_int(f, opts, "seq_len", 128, 1)
  local bs = U.opt_int(f, opts, "batch_size", 8, 1)
  local first = U.opt_int(f, opts, "first", 0, 0)
  local format = opts.format or (path:match("%.tsv$") and "tsv" or "jsonl")
  if format ~= "jsonl" and format ~= "tsv" then U.fail(f, "option 'format' must be \"jsonl\" or \"tsv\", got %s", U.describe(format)) end
  local windows = ds:num_windows(sl)
  if first >= windows then U.fail(f, "the dataset has %d windows of seq_len %d; first is %d", windows, sl, first) end
  nseq = math.min(nseq, windows - first)
  local meta = {
    num_experts = self.num_experts, experts_per_token = self.top_k, num_layers = #self.layers,
    moe_layers = traces.moe_layer_indices(self.config, #self.layers), seq_len = sl,
    vocab_size = self.config.vocab_size, num_sequences = nseq, first_window = first,
  }
  local w = traces.writer(path, format, meta, opts.weights ~= false)
  local ok, err = pcall(function()
    local done = 0
    while done < nseq do
      local count = math.min(bs, nseq - done)
      local ids = ds:window_batch(sl, first + done, count)
      local r = self:_route(ids, false)
      for b = 0, count - 1 do
        for s = 0, sl - 1 do
          local n = b * sl + s + 1
          for l = 1, #self.layers do
            w:write(first + done + b, s, r.ids[n], l - 1, r.layers[l].experts[n], r.layers[l].weights[n])
          end
        end
      end
      done = done + count
    end
  end)
  if not ok then w:abort(); error(err, 0) end
  return w:close()
end

--- read_traces(path) -> {meta = {...}, records = {...}}: loads a trace file
-- written by write_traces (also moe.RouterAnalyzer.read_traces(path)).
function Analyzer:read_traces(path)
  check_self("RouterAnalyzer:read_traces", self)
  return traces.read(path, "RouterAnalyzer:read_traces")
end

--- moe.RouterAnalyzer(model): model is a moe.MoEModel or an nn.Model.
-- moe.RouterAnalyzer.read_traces(path) reads a trace file without a model.
M.RouterAnalyzer = setmetatable({
  read_traces = function(path) return traces.read(path, "RouterAnalyzer.read_traces") end,
}, {__call = function(_, model) return new_analyzer(model) end})

M.Analyzer = Analyzer
return M
