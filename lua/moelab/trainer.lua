--- moe.MoETrainer: the training loop. AdamW with decay/no-decay groups and
-- per-group learning rates (router, experts, the rest), warmup then cosine or
-- linear decay, gradient accumulation, global-norm clipping, a NaN/Inf guard,
-- evaluation, live progress, metrics JSONL and atomic, resumable checkpoints.
local core = require "moelab.core"
local mio = require "moelab.io"
local routing = require "moelab.routing"
local checkpoint = require "moelab.checkpoint"

local M = {}
local Trainer = {}
Trainer.__index = Trainer

local function fail(fname, fmt, ...) error(fname .. ": " .. string.format(fmt, ...), 3) end

local function opt_number(fname, opts, key, default, lo, hi)
  local v = opts[key]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v then fail(fname, "%s must be a number, got %s", key, type(v)) end
  if lo and v < lo then fail(fname, "%s must be >= %g, got %g", key, lo, v) end
  if hi and v > hi then fail(fname, "%s must be <= %g, got %g", key, hi, v) end
  return v
end

local function opt_int(fname, opts, key, default, lo)
  local v = opt_number(fname, opts, key, default, lo)
  if v ~= nil and v % 1 ~= 0 then fail(fname, "%s must be an integer, got %g", key, v) end
  return v
end

local function check_keys(fname, opts, allowed)
  for k in pairs(opts) do
    if not allowed[k] then
      local names = {}
      for n in pairs(allowed) do names[#names + 1] = n end
      table.sort(names)
      fail(fname, "unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
end

local trainer_keys = {
  model = true, load_balancing = true, aux_loss_coef = true, router_z_loss_coef = true, weight_decay = true,
  betas = true, eps = true, grad_clip = true, router_learning_rate = true, expert_learning_rate = true,
  freeze_router = true, freeze_experts = true, freeze_rest = true, trainable = true, grad_hook = true, run_dir = true, log_every = true, progress = true, monitor = true,
  precision = true, optimizer_state = true, master_weights = true, cuda_graph = true, recompute = true,
}

--- MoETrainer{model, load_balancing = "auxiliary_loss" | LoadBalancer{...}, aux_loss_coef=,
--  router_z_loss_coef=0.001, weight_decay=0.1, betas={0.9, 0.95}, eps=1e-8, grad_clip=1.0,
--  router_learning_rate=, expert_learning_rate=, freeze_router=false, freeze_experts=false,
--  freeze_rest=false (attention, norms, embeddings, head),
--  trainable = function(name) -> boolean (parameters it rejects are frozen; e.g. moe.peft.is_lora_param),
--  grad_hook = function(trainer) (after the step's backward, before clipping),
--  run_dir=, log_every=10, progress=true, monitor = moe.RouterMonitor(model),
--  precision = "f32" | "bf16" (bf16: mixed precision on a CUDA model: bf16 compute and
--  gradients, f32 master weights and AdamW state; the model is switched when the trainer is made),
--  optimizer_state = "f32" | "bf16" (AdamW's m and v: bf16 halves their memory and traffic,
--  stochastically rounded; the master weights stay f32),
--  master_weights = "split" | "f32" (under bf16 precision: "split", the default, keeps each f32
--  master weight exactly but as the bf16 compute copy plus a 16-bit low half while training,
--  2 bytes a parameter less memory and AdamW traffic; the f32 values come back whenever
--  anything reads them. "f32": the f32 buffer and the compute copy side by side),
--  cuda_graph = "auto" | true | false (capture the step into a CUDA graph and replay it:
--  moelab.step_graph. "auto", the default: where the step can be captured, else eager
--  steps, with a notice when a graph in use had to end or a capture failed; true: an
--  error when the step cannot be captured; false: never),
--  recompute = "none" | "norms" | "norms_qkv" (activation memory: "norms" gives back the
--  RMSNorms' outputs after the forward, the blocks' two norms and the QK-norms with their
--  rotation, and the backward makes them again from the inputs it keeps; "norms_qkv" also
--  the attention's q, k and v projections, a GEMM each. The same bytes in less memory: at
--  issue #6's step (8192 tokens of d 1024, 8 layers) the activations go from 1.94 GB to
--  1.39 ("norms") for about 2% of the step's time; bench/RESULTS.md)}
function M.MoETrainer(opts)
  local f = "MoETrainer"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  check_keys(f, opts, trainer_keys)
  local model = opts.model
  if type(model) ~= "table" or not model.net then fail(f, "model must be a moe.MoEModel, got %s", type(model)) end
  local lb = opts.load_balancing or "auxiliary_loss"
  if type(lb) == "string" then
    local ok, obj = pcall(routing.LoadBalancer, {method = lb})
    if not ok then fail(f, "%s", (tostring(obj):gsub("^LoadBalancer: ", "load_balancing: "))) end
    lb = obj
  elseif type(lb) ~= "table" or lb.kind ~= "LoadBalancer" then
    fail(f, "load_balancing must be a method name or moe.routing.LoadBalancer{...}")
  end
  local betas = opts.betas or {0.9, 0.95}
  if type(betas) ~= "table" or type(betas[1]) ~= "number" or type(betas[2]) ~= "number" then
    fail(f, "betas must be {beta1, beta2}")
  end
  local self = setmetatable({
    model = model,
    load_balancer = lb,
    aux_loss_coef = opt_number(f, opts, "aux_loss_coef", lb.aux_loss_coef, 0),
    router_z_loss_coef = opt_number(f, opts, "router_z_loss_coef", 0.001, 0),
    weight_decay = opt_number(f, opts, "weight_decay", 0.1, 0),
    beta1 = betas[1], beta2 = betas[2],
    eps = opt_number(f, opts, "eps", 1e-8, 0),
    grad_clip = opt_number(f, opts, "grad_clip", 1.0, 0),
    router_lr = opt_number(f, opts, "router_learning_rate", nil, 0),
    expert_lr = opt_number(f, opts, "expert_learning_rate", nil, 0),
    freeze_router = opts.freeze_router == true,
    freeze_experts = opts.freeze_experts == true,
    freeze_rest = opts.freeze_rest == true,
    run_dir = opts.run_dir,
    log_every = opt_int(f, opts, "log_every", 10, 1),
    progress = opts.progress ~= false,
    history = {},
    step = 0,
  }, Trainer)
  if opts.monitor ~= nil and not require("moelab.analytics.monitor").is_monitor(opts.monitor) then
    fail(f, "monitor must be a moe.RouterMonitor")
  end
  self.monitor = opts.monitor
  if opts.grad_hook ~= nil and type(opts.grad_hook) ~= "function" then fail(f, "grad_hook must be a function(trainer)") end
  self.grad_hook = opts.grad_hook
  if opts.trainable ~= nil and type(opts.trainable) ~= "function" then fail(f, "trainable must be a function(name) -> boolean") end
  self.trainable = opts.trainable
  if self.beta1 < 0 or self.beta1 >= 1 or self.beta2 < 0 or self.beta2 >= 1 then fail(f, "betas must be in [0, 1)") end
  if self.run_dir ~= nil and type(self.run_dir) ~= "string" then fail(f, "run_dir must be a path string") end
  if opts.cuda_graph ~= nil and type(opts.cuda_graph) ~= "boolean" and opts.cuda_graph ~= "auto" then
    fail(f, "cuda_graph must be true, false or \"auto\", got %s", tostring(opts.cuda_graph))
  end
  if opts.cuda_graph == nil then self.cuda_graph = "auto" else self.cuda_graph = opts.cuda_graph end
  self.optimizer_state = opts.optimizer_state or "f32"
  if self.optimizer_state ~= "f32" and self.optimizer_state ~= "bf16" then
    fail(f, "optimizer_state must be \"f32\" or \"bf16\", got %s", tostring(opts.optimizer_state))
  end
  self.recompute = opts.recompute or "none"
  if self.recompute ~= "none" and self.recompute ~= "norms" and self.recompute ~= "norms_qkv" then
    fail(f, "recompute must be \"none\", \"norms\" or \"norms_qkv\", got %s", tostring(opts.recompute))
  end
  self.master_weights = opts.master_weights or "split"
  if self.master_weights ~= "split" and self.master_weights ~= "f32" then
    fail(f, "master_weights must be \"split\" or \"f32\", got %s", tostring(opts.master_weights))
  end
  if opts.precision ~= nil then
    if opts.precision ~= "bf16" and opts.precision ~= "f32" then
      fail(f, "precision must be \"bf16\" or \"f32\", got %s", tostring(opts.precision))
    end
    local ok, err = pcall(model.set_precision, model, opts.precision)
    if not ok then fail(f, "%s", (tostring(err):gsub("^layer:set_precision: ", ""))) end
  end
  self.aux_free = false
  for _, l in ipairs(model:moe_layers()) do
    if #l:buffers() > 0 then self.aux_free = true end
  end
  return self
end

--- Which group a parameter belongs to, by its Hugging Face-style name.
local function group_of(name)
  if name:find("%.mlp%.gate%.") or name:find("%.mlp%.noise%.") then return "router" end
  if name:find("%.mlp%.experts%.") or name:find("%.mlp%.shared_expert%.") then return "experts" end
  return "rest"
end
M.group_of = group_of

function Trainer:_make_optimizer(base_lr)
  local scales, decay = {}, {}
  for i, p in ipairs(self.model:parameters()) do
    local g = group_of(p.name)
    local s = 1
    if g == "router" then
      if self.freeze_router then s = 0 elseif self.router_lr then s = self.router_lr / base_lr end
    elseif g == "experts" then
      if self.freeze_experts then s = 0 elseif self.expert_lr then s = self.expert_lr / base_lr end
    elseif self.freeze_rest then
      s = 0
    end
    if self.trainable and not self.trainable(p.name) then s = 0 end
    scales[i] = s
    decay[i] = #p.value:shape() >= 2   -- matrices decay; norms and biases do not
  end
  self.optimizer = core.adamw(self.model.net, {beta1 = self.beta1, beta2 = self.beta2, eps = self.eps,
                                               weight_decay = self.weight_decay, lr_scale = scales, decay = decay,
                                               range = self.optimizer_range,   -- ZeRO shard (dist_zero.lua)
                                               state_dtype = self.optimizer_state, master = self.master_weights})
  self.base_lr = base_lr
end

local function lr_at(step, o)
  if o.warmup_steps > 0 and step <= o.warmup_steps then return o.learning_rate * step / o.warmup_steps end
  if o.lr_schedule == "constant" then return o.learning_rate end
  local span = math.max(1, o.max_steps - o.warmup_steps)
  local t = math.min(1, math.max(0, (step - o.warmup_steps) / span))
  local floor = o.learning_rate * o.min_lr_ratio
  if o.lr_schedule == "linear" then return floor + (o.learning_rate - floor) * (1 - t) end
  return floor + (o.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * t))
end
M.lr_at = lr_at


local function is_dataset(x) return type(x) == "userdata" and pcall(function() return x:num_tokens() end) end

local train_keys = {
  train_data = true, eval_data = true, batch_size = true, seq_len = true, learning_rate = true, max_steps = true,
  num_epochs = true, warmup_steps = true, lr_schedule = true, min_lr_ratio = true,
  gradient_accumulation_steps = true, eval_every = true, eval_batches = true, save_every = true, seed = true,
  resume = true, max_skipped_steps = true, batch_fn = true, save_final = true,
}

local function fmt_count(n)
  if n >= 1e6 then return string.format("%.1fM", n / 1e6) end
  if n >= 1e3 then return string.format("%.1fk", n / 1e3) end
  return string.format("%.0f", n)
end

local function fmt_time(s)
  if s ~= s or s == math.huge then return "?" end
  if s >= 3600 then return string.format("%dh%02dm", math.floor(s / 3600), math.floor(s % 3600 / 60)) end
  if s >= 60 then return string.format("%dm%02ds", math.floor(s / 60), math.floor(s % 60)) end
  return string.format("%.0fs", s)
end

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end

--- apply_clip(net, optimizer, norm, max_norm[, extra]): gradient clipping by
-- the global norm (core.clip_grad_norm's rule) times an extra factor (the 1/W
-- of summed sharded gradients): f = extra * max_norm / (norm + 1e-6) when
-- norm > max_norm. The optimizer's next step applies it when it can take one
-- (no pass over the gradients), else the gradients are scaled here. Nothing
-- for a non-finite norm: that step is skipped.
function M.apply_clip(net, optimizer, norm, max_norm, extra)
  if not finite(norm) then return end
  local f = extra or 1
  if max_norm > 0 and norm > max_norm then f = f * max_norm / (norm + 1e-6) end
  if f == 1 then return end
  if optimizer and optimizer.scale_next_step then
    optimizer:scale_next_step(f)
  else
    local _, grads = net:flat_parameters()
    grads:copy(grads * f)
  end
end

--- Summary of routing health over the MoE layers of the last forward.
local function router_health(routing_stats)
  local mv, dr, ent, n = 0, 0, 0, 0
  for _, s in pairs(routing_stats) do
    if s then mv = math.max(mv, s.max_vio); dr = dr + s.drop_rate; ent = ent + s.entropy; n = n + 1 end
  end
  if n == 0 then return nil end
  return {max_vio = mv, drop_rate = dr / n, entropy = ent / n}
end

-- Queues one step's forwards and backwards (every micro-batch); returns the
-- pending {loss, aux, z} of each and the last forward's routing statistics
-- (nil with routing_stats = false: a captured forward must not read them).
local function queue_forward_backward(self, batches, scale, routing_stats)
  local net = self.model.net
  -- lazy: the expert banks' gradients are overwritten by their first backward
  -- (no memset); this loop reads gradients only through the layer
  net:zero_grad{lazy = true}
  local pending, stats = {}, nil
  -- the upstream gradient each loss gets, promised to the forward: the head's
  -- weight gradient goes in there without a pass of its own. scale holds it
  -- (both callers make it 1 / the micro-batches), but on the device: reading
  -- it back would wait, and cannot be captured into a CUDA graph
  local loss_grad = 1 / #batches
  for micro, b in ipairs(batches) do
    local out = self.model:forward(b[1], {targets = b[2], aux_loss_coef = self.aux_loss_coef,
                                          router_z_loss_coef = self.router_z_loss_coef, keep_logits = false,
                                          loss_grad = loss_grad, routing_stats = routing_stats,
                                          recompute = self.recompute})
    if self.monitor then self.monitor:record() end
    stats = out.routing
    -- a non-finite loss gives non-finite gradients; the step is skipped below.
    -- One backward a tape: it lets go of each layer's activations once past
    -- them, so the backward's own tensors come out of what the forward held
    out.tape:set_one_backward(true)
    out.tape:backward(out.total_loss, scale)
    pending[micro] = {out.loss, out.aux_loss, out.z_loss}
    -- release activations now rather than at the next garbage collection
    out.tape:reset()
  end
  return pending, stats
end

-- Reads of one-element device tensors, started (queued) and finished (waited for).
local function start_reads(vals)
  local reads = {}   -- at most 16 values a read
  for i = 1, #vals, 16 do reads[#reads + 1] = core.read_async(unpack(vals, i, math.min(i + 15, #vals))) end
  return reads
end
local function finish_reads(reads)
  local got = {}
  for _, r in ipairs(reads) do for _, v in ipairs{r:wait()} do got[#got + 1] = v end end
  return got
end

-- One whole step on the device: forwards, backwards, the norm, the NaN/Inf
-- guard and the clipped update, nothing read. Returns the values the host
-- reads, {sumsq, guard, loss_1, aux_1, z_1, ...}, the routing statistics, and
-- what before_update(values) returned (the eager step starts its reads there,
-- so they wait for the backward, not the update).
local function queue_device_step(self, batches, scale, max_norm, lr, before_update, routing_stats)
  local pending, stats = queue_forward_backward(self, batches, scale, routing_stats)
  local sumsq = core.grad_sumsq(self.model.net)
  local guard = pending[1][1]
  for i = 2, #pending do guard = guard + pending[i][1] end
  -- the host reads the guard the device judges, so both see the same skip
  local vals = {sumsq, guard}
  for _, p in ipairs(pending) do vals[#vals + 1] = p[1]; vals[#vals + 1] = p[2]; vals[#vals + 1] = p[3] end
  local pre = before_update and before_update(vals)
  self.optimizer:clip_next_step(sumsq, max_norm, guard)
  self.optimizer:step(lr)
  return vals, stats, pre
end

--- train{train_data=, eval_data=, batch_size=8, seq_len=64, learning_rate=3e-4, max_steps= | num_epochs=,
--  warmup_steps=0, lr_schedule="cosine"|"linear"|"constant", min_lr_ratio=0.1,
--  gradient_accumulation_steps=1, eval_every=0, eval_batches=8, save_every=0, seed=0,
--  resume = <checkpoint dir> | true (the run_dir's latest),
--  batch_fn = function(index) return ids, targets end (instead of train_data's batches),
--  save_final = true (false: no closing checkpoint in run_dir)}
function Trainer:train(opts)
  local f = "MoETrainer:train"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  check_keys(f, opts, train_keys)
  local ds = opts.train_data
  local batch_fn = opts.batch_fn
  if batch_fn ~= nil and type(batch_fn) ~= "function" then fail(f, "batch_fn must be a function(index) returning ids, targets") end
  if not batch_fn and not is_dataset(ds) then
    fail(f, "train_data must be a dataset (moe.data.corpus{...}, moe.data.from_file(...)), got %s", type(ds))
  end
  if opts.eval_data ~= nil and not is_dataset(opts.eval_data) then fail(f, "eval_data must be a dataset") end
  local o = {
    batch_size = opt_int(f, opts, "batch_size", 8, 1),
    seq_len = opt_int(f, opts, "seq_len", 64, 1),
    learning_rate = opt_number(f, opts, "learning_rate", 3e-4, 0),
    warmup_steps = opt_int(f, opts, "warmup_steps", 0, 0),
    lr_schedule = opts.lr_schedule or "cosine",
    min_lr_ratio = opt_number(f, opts, "min_lr_ratio", 0.1, 0, 1),
    accum = opt_int(f, opts, "gradient_accumulation_steps", 1, 1),
    eval_every = opt_int(f, opts, "eval_every", 0, 0),
    eval_batches = opt_int(f, opts, "eval_batches", 8, 1),
    save_every = opt_int(f, opts, "save_every", 0, 0),
    seed = opt_int(f, opts, "seed", 0, 0),
    max_skipped = opt_int(f, opts, "max_skipped_steps", 10, 0),
  }
  if o.lr_schedule ~= "cosine" and o.lr_schedule ~= "linear" and o.lr_schedule ~= "constant" then
    fail(f, "lr_schedule must be \"cosine\", \"linear\" or \"constant\", got %s", tostring(o.lr_schedule))
  end
  if ds then
    if ds:vocab_size() > self.model.config.vocab_size then
      fail(f, "train_data has vocabulary %d but the model's vocab_size is %d", ds:vocab_size(), self.model.config.vocab_size)
    end
    if ds:num_tokens() <= o.seq_len + 1 then fail(f, "train_data has %d tokens, fewer than seq_len + 1", ds:num_tokens()) end
  end
  local tokens_per_step = o.batch_size * o.seq_len * o.accum
  if opts.max_steps ~= nil then
    o.max_steps = opt_int(f, opts, "max_steps", nil, 1)
  elseif opts.num_epochs ~= nil and ds then
    local epochs = opt_number(f, opts, "num_epochs", nil, 0)
    o.max_steps = math.max(1, math.ceil(epochs * ds:num_tokens() / tokens_per_step))
  else
    fail(f, "give max_steps or num_epochs")
  end
  self.train_options = o

  if not self.optimizer or self.base_lr ~= o.learning_rate then self:_make_optimizer(o.learning_rate) end
  local start = self.step
  if opts.resume then
    local dir = opts.resume
    if dir == true then
      if not self.run_dir then fail(f, "resume = true needs the trainer's run_dir") end
      dir = self.run_dir .. "/checkpoint"
    end
    if type(dir) ~= "string" then fail(f, "resume must be a checkpoint directory or true") end
    -- load_fn: dist_shard.lua's loading into sharded experts, dist_zero.lua's into
    -- ZeRO optimizer shards (both slice the single-process layout)
    local load = self.load_fn or checkpoint.load_training
    load(self, dir)
    start = self.step
  end
  if self.run_dir then mio.mkdir_p(self.run_dir) end
  local metrics = self.run_dir and assert(io.open(self.run_dir .. "/metrics.jsonl", start > 0 and "a" or "w"))

  local tty = self.progress and core.isatty(1)
  local net = self.model.net
  self.model:train(true)
  local t_start = core.clock()
  local tokens_done, skipped_in_row, skipped = 0, 0, 0
  local last
  local scale = core.full({}, 1 / o.accum)
  -- Without a gradient hook or a sharded clip, the norm, the clipping and the
  -- NaN/Inf guard stay on the device: the update is queued right behind the
  -- backward and skips itself there when the norm or the losses are not
  -- finite; the host reads the values once, after queuing it. (Reading them
  -- first left the GPU idle between the backward, the norm and the update.)
  local on_device = not self.grad_hook and not self.clip_fn and self.optimizer.clip_next_step ~= nil
  local graph   -- the step as a CUDA graph (cuda_graph option; moelab.step_graph)
  self.graph_info = nil
  if self.cuda_graph then
    local step_graph = require "moelab.step_graph"
    local why = step_graph.unsuitable(self, on_device)
    if why and self.cuda_graph == true then fail(f, "cuda_graph = true, but the step cannot be captured: %s", why) end
    if not why then
      graph = step_graph.new(self, function(...) return queue_device_step(self, ...) end)
      self.step_graph = graph
    end
  end
  local function end_graph()
    local g = graph
    graph, self.step_graph = nil, nil
    if g then
      self.graph_info = g:info()   -- the last run's graph: {nodes=, launches=, pool_bytes=} (nil: not captured)
      g:free()
    end
  end
  local function batches_for(step)
    local batches = {}
    for micro = 1, o.accum do
      -- a batch is a pure function of its index, which is what makes resuming exact
      local index = (step - 1) * o.accum + micro - 1
      local ids, targets
      if batch_fn then ids, targets = batch_fn(index)
      else ids, targets = ds:batch{batch_size = o.batch_size, seq_len = o.seq_len, seed = o.seed, step = index} end
      batches[micro] = {ids, targets}
    end
    return batches
  end
  local prefetched   -- the next step's batches, fetched when its replay was queued early
  -- the steps; on an error the graph goes first (its inputs, its pool, the
  -- optimizer's device state), then the error goes on
  local function steps()
    for step = start + 1, o.max_steps do
      local t0 = core.clock()
      local batches = prefetched or batches_for(step)
      prefetched = nil
      local loss_sum, aux_sum, z_sum, bad = 0, 0, 0, false
      local max_norm = self.grad_clip > 0 and self.grad_clip or math.huge
      local lr = lr_at(step, o)
      local gnorm, got, stats
      if graph then
        local why
        -- the next replay may be queued before this step's values are read, unless
        -- something must run between the two (an evaluation, a checkpoint) or the
        -- run would stop after this step should it be skipped
        local between = (o.eval_every > 0 and opts.eval_data and step % o.eval_every == 0) or
                        (o.save_every > 0 and step % o.save_every == 0)
        local next_step
        if step < o.max_steps and not between and skipped_in_row + 1 <= o.max_skipped then
          next_step = function()
            prefetched = batches_for(step + 1)
            return prefetched, lr_at(step + 1, o)
          end
        end
        local quiet
        got, stats, quiet = graph:run(batches, lr, max_norm, o.accum, start_reads, finish_reads, next_step)
        if not got then
          why = stats
          end_graph()
          if self.cuda_graph == true then fail(f, "step %d: cuda_graph = true, but %s", step, why) end
          if not quiet then
            io.stderr:write(string.format("\nstep %d: the CUDA graph of the step is off from here on: %s\n", step, why))
          end
        end
      end
      if not got and on_device then
        -- the values' copies are queued before the update, and waited for alone:
        -- the host keeps the books and queues the next step while it runs
        local reads
        stats, reads = select(2, queue_device_step(self, batches, scale, max_norm, lr, start_reads))
        got = finish_reads(reads)
      end
      if got then
        bad = not finite(got[2])
        for m = 1, o.accum do
          local l = got[3 * m]
          if not finite(l) then bad = true end
          loss_sum, aux_sum, z_sum = loss_sum + l, aux_sum + got[3 * m + 1], z_sum + got[3 * m + 2]
        end
        gnorm = bad and 0 / 0 or math.sqrt(got[1])
      else
        local pending
        pending, stats = queue_forward_backward(self, batches, scale)
        for _, p in ipairs(pending) do
          local l = p[1]:item()
          if not finite(l) then bad = true end
          loss_sum = loss_sum + l
          aux_sum = aux_sum + p[2]:item()
          z_sum = z_sum + p[3]:item()
        end
        -- e.g. the data-parallel all-reduce of the flat gradient buffer
        if self.grad_hook and not bad then self.grad_hook(self) end
        -- clip_fn: the global-norm clipping of ZeRO-2 gradient shards (dist_zero.lua) or of sharded experts (dist_shard.lua)
        if bad then
          gnorm = 0 / 0
        elseif self.clip_fn then
          gnorm = self.clip_fn(net, max_norm)
        else
          gnorm = core.grad_norm(net)
          M.apply_clip(net, self.optimizer, gnorm, max_norm)
        end
      end
      local rec = {step = step, loss = loss_sum / o.accum, aux_loss = aux_sum / o.accum, z_loss = z_sum / o.accum,
                   lr = lr, grad_norm = gnorm}
      if bad or not finite(gnorm) then
        -- NaN/Inf guard: skip the update, keep going, say so (queued on the device,
        -- the update left everything as it was; its step count is taken back, where
        -- the host keeps it: a count kept on the device did not advance)
        if on_device and not (self.optimizer.device_state and self.optimizer:device_state()) then
          self.optimizer:step_count(self.optimizer:step_count() - 1)
        end
        skipped, skipped_in_row = skipped + 1, skipped_in_row + 1
        rec.skipped = true
        io.stderr:write(string.format("\nstep %d: non-finite %s; update skipped\n", step, bad and "loss" or "gradient norm"))
        net:zero_grad()
      else
        skipped_in_row = 0
        if not on_device then self.optimizer:step(lr) end
        if self.aux_free then self.model:update_router_bias() end
      end
      self.step = step
      local dt = core.clock() - t0
      tokens_done = tokens_done + tokens_per_step
      rec.tokens_per_s = tokens_per_step / math.max(dt, 1e-9)
      rec.routing = {}
      for i, s in pairs(stats) do
        rec.routing[i] = {load = s.load, drop_rate = s.drop_rate, entropy = s.entropy, max_vio = s.max_vio}
      end
      local health = router_health(stats)
      if health then rec.max_vio, rec.drop_rate, rec.router_entropy = health.max_vio, health.drop_rate, health.entropy end
      self.history[#self.history + 1] = rec
      last = rec
      if skipped_in_row > o.max_skipped then
        end_graph()
        if metrics then metrics:close() end
        self.model:train(false)
        error(string.format("%s: %d consecutive steps had non-finite losses or gradients; stopping (lower the learning rate?)",
          f, skipped_in_row), 2)
      end
      if metrics then
        local line = {}
        for k, v in pairs(rec) do if k ~= "routing" then line[k] = v end end
        if not finite(line.grad_norm) then line.grad_norm = nil end
        if not finite(line.loss) then line.loss = nil end
        line.load = {}
        for i, r in pairs(rec.routing) do line.load[i] = r.load end
        metrics:write(mio.json.encode(line), "\n")
        metrics:flush()
      end
      if self.progress then
        local elapsed = core.clock() - t_start
        local eta = elapsed / (step - start) * (o.max_steps - step)
        local line = string.format("step %d/%d | loss %.4f | aux %.3f | lr %.2e | %s tok/s%s | eta %s",
          step, o.max_steps, rec.loss, rec.aux_loss, lr, fmt_count(tokens_done / math.max(elapsed, 1e-9)),
          health and string.format(" | maxvio %.2f | drop %.3f", health.max_vio, health.drop_rate) or "", fmt_time(eta))
        if tty then
          io.write("\r\27[K", line)
          io.flush()
        elseif step % self.log_every == 0 or step == o.max_steps or step == start + 1 then
          print(line)
        end
      end
      if o.eval_every > 0 and opts.eval_data and step % o.eval_every == 0 then
        local ev = self:evaluate(opts.eval_data, {batches = o.eval_batches})
        rec.eval_loss, rec.eval_perplexity = ev.loss, ev.perplexity
        if self.progress then
          if tty then io.write("\n") end
          print(string.format("eval at step %d: loss %.4f, perplexity %.2f", step, ev.loss, ev.perplexity))
        end
      end
      if o.save_every > 0 and step % o.save_every == 0 then self:_save_run_checkpoint() end
    end
  end
  local ran, err = pcall(steps)
  if not ran then
    local queued = graph and graph.queued
    local freed, ferr = pcall(end_graph)
    err = tostring(err)
    if queued then
      err = err .. " (the next step's replay had been queued on the device and ran: unless it was skipped there, "
        .. "the model is one update past trainer.step)"
    end
    if not freed then err = err .. "\n(while freeing the step's CUDA graph: " .. tostring(ferr) .. ")" end
    error(err, 0)
  end
  end_graph()
  if tty then io.write("\n") end
  if metrics then metrics:close() end
  self.model:train(false)
  local elapsed = core.clock() - t_start
  local result = {
    steps = self.step, final_loss = last and last.loss, tokens = tokens_done, seconds = elapsed,
    tokens_per_s = tokens_done / math.max(elapsed, 1e-9), skipped_steps = skipped, history = self.history,
    run_dir = self.run_dir,
  }
  if opts.eval_data then result.eval = self:evaluate(opts.eval_data, {batches = o.eval_batches}) end
  -- save_final = false keeps metrics.jsonl but skips the closing checkpoint
  -- (a large model's optimizer state can be tens of gigabytes)
  if opts.save_final ~= false then self:_save_run_checkpoint() end
  return result
end

-- The run's checkpoint, <run_dir>/checkpoint (none without run_dir). save_fn,
-- when set (dist_shard.lua, sharded experts; dist_zero.lua, ZeRO), runs on
-- every rank, with or without run_dir: gathering the expert or optimizer
-- shards is a collective, and only the rank that has the run_dir writes.
function Trainer:_save_run_checkpoint()
  local dir = self.run_dir and self.run_dir .. "/checkpoint"
  if self.save_fn then return self.save_fn(self, dir) end
  if dir then return checkpoint.save_training(self, dir) end
end

--- evaluate(dataset[, {batches=, batch_size=, seq_len=}]) -> {loss=, perplexity=, tokens=}
-- Mean cross-entropy over consecutive windows of the dataset (all of it
-- unless batches limits the count).
function Trainer:evaluate(ds, opts)
  local f = "MoETrainer:evaluate"
  if not is_dataset(ds) then fail(f, "expected a dataset, got %s", type(ds)) end
  opts = opts or {}
  local t = self.train_options or {}
  local bs = opt_int(f, opts, "batch_size", t.batch_size or 8, 1)
  local seq = opt_int(f, opts, "seq_len", t.seq_len or 64, 1)
  local windows = ds:num_windows(seq)
  if windows < 1 then fail(f, "the dataset has fewer than seq_len + 1 tokens") end
  local nb = math.ceil(windows / bs)
  if opts.batches then nb = math.min(nb, opt_int(f, opts, "batches", nil, 1)) end
  local was_training = self.model.net:is_training()
  self.model:train(false)
  local total, count = 0, 0
  for b = 0, nb - 1 do
    local first = b * bs
    local n = math.min(bs, windows - first)
    local ids, targets = ds:window_batch(seq, first, n)
    local dev = self.model.net:device()
    if dev ~= "cpu" then ids, targets = ids:to(dev), targets:to(dev) end
    local logits = self.model.net:forward(ids)
    local loss = core.Tape():cross_entropy(logits, targets, {grad_in_forward = false}):item()
    total = total + loss * n
    count = count + n
  end
  self.model:train(was_training)
  local mean = total / math.max(count, 1)
  return {loss = mean, perplexity = math.exp(mean), tokens = count * seq}
end

--- save_model(dir): model.safetensors + config.json (loadable with moe.load).
function Trainer:save_model(dir) return checkpoint.save_model(self.model, dir) end
function Trainer:save_checkpoint(dir)
  local f = "MoETrainer:save_checkpoint"
  if dir == nil then
    if not self.run_dir then fail(f, "give a directory (the trainer has no run_dir)") end
    dir = self.run_dir .. "/checkpoint"
  end
  if type(dir) ~= "string" then fail(f, "the directory must be a string, got %s", type(dir)) end
  if not self.optimizer then
    fail(f, "nothing to resume from yet: a training checkpoint holds the optimizer state, made by the first train() "
      .. "call (trainer:save_model(dir) saves the weights alone)")
  end
  return checkpoint.save_training(self, dir)
end

--- visualize_routing{save_to=, dataset=, num_samples=32, ...}: the routing report (moelab.report).
-- With run_dir: from its metrics.jsonl, checkpoint/ (saved first unless it is of the current step)
-- and the live model; save_to defaults to <run_dir>/report.pdf. Without: from the model in memory
-- and trainer.history (save_to required). Returns the path(s) written and the report's data.
function Trainer:visualize_routing(opts)
  local f = "MoETrainer:visualize_routing"
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(f, "expected a table of options {save_to=, ...}, got %s", type(opts)) end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  for _, k in ipairs{"run_dir", "model", "history", "train_options"} do
    if o[k] ~= nil then fail(f, "option '%s' is the trainer's own; do not pass it", k) end
  end
  o.model = self.model
  if self.run_dir then
    local dir = self.run_dir .. "/checkpoint"
    local ok, state = pcall(function() return mio.json.decode(mio.read_file(dir .. "/trainer_state.json")) end)
    local saved_step = ok and type(state) == "table" and state.step or nil
    if self.optimizer and saved_step ~= self.step then checkpoint.save_training(self, dir) end
    o.run_dir = self.run_dir
  else
    if o.save_to == nil then fail(f, "save_to is required when the trainer has no run_dir") end
    o.history = self.history
    o.train_options = self.train_options
  end
  return require("moelab.report").build(o)
end

M.Trainer = Trainer
return M
