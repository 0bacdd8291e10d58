--- The training step as a CUDA graph (MoETrainer's cuda_graph option).
--
-- The step's forwards, backwards, gradient norm and AdamW update are captured
-- once and replayed with one launch a step, so the GPU no longer waits at the
-- boundaries of some 1,500 kernels for the host to queue the next. What a
-- replay cannot take from the capture is kept on the device:
-- - the batch: fixed device tensors, filled from the host before each launch;
-- - the learning rate and AdamW's step count (optimizer:set_device_state);
-- - the loss gradient's seed: a device scalar made once;
-- - the expert offsets: every MoE layer's routing leaves its counts on the
--   device (layer:set_defer_routing) and the expert GEMMs read them there.
-- After each launch the host reads the losses, the norm and the routing
-- statistics the replay wrote into the capture's tensors, while the next
-- step's replay, queued behind it, runs.
--
-- The first step is captured, then launched; when that capture fails it
-- runs eagerly through the same inputs (first-use set-ups and allocations
-- then happen outside the graph) and the second step is captured. A batch
-- the graph cannot take (other shapes, ids or targets outside [0, vocab),
-- e.g. ignored positions, whose count the capture fixed) or a capture that
-- fails ends the graph: the trainer goes on eagerly.
local core = require "moelab.core"

local M = {}
local Step = {}
Step.__index = Step

local function device_index(dev)
  return tonumber(tostring(dev):match("^cuda:(%d+)$")) or 0
end

--- unsuitable(trainer, on_device) -> nil when the step can be captured, else why not
function M.unsuitable(trainer, on_device)
  local dev = tostring(trainer.model:device())
  if not dev:match("^cuda") then return "the model is on " .. dev .. ", not on a CUDA device" end
  if not core.has_cuda then return "this moelab has no CUDA device" end
  if not on_device then
    return "the step is clipped on the host (a grad_hook, a sharded clip, or an optimizer without clip_next_step)"
  end
  if trainer.aux_free then return "auxiliary-loss-free balancing updates the router bias on the host after each step" end
  if trainer.monitor then return "a RouterMonitor reads every forward's routing on the host" end
  if not trainer.optimizer.set_device_state then return "the optimizer cannot keep its step count on the device" end
  -- the expert GEMMs must read their offsets on the device: bf16 SwiGLU experts,
  -- top-k routing that keeps every choice (then only the split of the rows moves)
  local c = trainer.model.config
  if trainer.model:precision() ~= "bf16" then return "the experts read their offsets on the device only in bf16" end
  if #trainer.model:moe_layers() > 0 then
    if c.activation ~= "swiglu" then return "the experts are not SwiGLU" end
    if c.router ~= "topk" then return "the router (" .. tostring(c.router) .. ") is not top-k" end
    if (c.capacity_factor or 0) > 0 then return "a capacity limit drops tokens, so the experts' rows change" end
    if (c.jitter_noise or 0) > 0 then return "router jitter draws new noise each step from a host counter" end
    if c.aux_loss_type == "global" then return "the global balancing loss is reduced across ranks on the host" end
  end
  for _, p in ipairs(trainer.model:parameters()) do
    if p.name:find("lora_", 1, true) then return "LoRA adapters read the expert offsets on the host" end
  end
  return nil
end

--- new(trainer, queue) -> a step graph. queue(batches, scale, max_norm, lr,
-- before_update, routing_stats) queues one whole step (the trainer's) and
-- returns the tensors the host reads after it, the routing statistics, and
-- what before_update(values) returned.
function M.new(trainer, queue)
  local dev = trainer.model:device()
  local self = setmetatable({
    trainer = trainer, queue = queue, dev = dev, index = device_index(dev),
    vocab = trainer.model.config.vocab_size, warm = false,
  }, Step)
  for _, l in ipairs(trainer.model:moe_layers()) do l:set_defer_routing(true) end
  trainer.optimizer:set_device_state(true)
  return self
end

-- The batches copied into the fixed inputs; false and why when the graph cannot take them.
function Step:_load(batches, accum)
  if not self.inputs then
    self.inputs = {}
    for m, b in ipairs(batches) do
      self.inputs[m] = {core.empty(b[1]:shape(), {dtype = "i64", device = self.dev}),
                        core.empty(b[2]:shape(), {dtype = "i64", device = self.dev})}
    end
    self.scale = core.full({}, 1 / accum):to(self.dev)
  end
  if #batches ~= #self.inputs then return false, "the number of micro-batches changed" end
  for m, b in ipairs(batches) do
    for k = 1, 2 do
      local src, dst = b[k], self.inputs[m][k]
      local a, s = src:shape(), dst:shape()
      local same = #a == #s
      for d = 1, #a do same = same and a[d] == s[d] end
      if not same then
        return false, string.format("a batch of shape [%s] after [%s]", table.concat(a, ", "), table.concat(s, ", "))
      end
      if src:dtype() ~= "i64" then return false, "ids and targets must be i64, got " .. src:dtype() end
      dst:copy(src)
      -- the copy learned the values' range on the host: the capture skipped the
      -- index checks and counted every target, which later batches must allow
      local bound = dst:index_bound()
      if src:device() ~= "cpu" then
        return false, "batches on the device (the graph learns the ids' range from a copy from the host)"
      elseif bound < 1 or bound > self.vocab then
        return false, string.format("%s outside [0, %d) (negative, e.g. ignored positions, or too large)",
          k == 1 and "ids" or "targets", self.vocab)
      end
    end
  end
  return true
end

-- Captures one step into self.graph; false and the error when it cannot be.
function Step:_capture(max_norm, lr)
  local t = self.trainer
  -- the eager step's freed memory goes back to the driver: the graph's own pool takes its place
  core.cuda_empty_cache(self.index)
  local g = core.cuda_graph_begin(self.index)
  local ok, err = pcall(function()
    self.values = self.queue(self.inputs, self.scale, max_norm, lr, nil, false)
    -- the layers' routing summaries into one buffer, read with one copy after each replay
    local parts, total = {}, 0
    for i, l in ipairs(t.model:moe_layers()) do
      parts[i] = l:routing_summary()
      if not parts[i] then error(string.format("MoE layer %d waited for its routing", i)) end
      total = total + parts[i]:numel()
    end
    if total > 0 then
      self.summaries = core.empty({total}, {dtype = "i64", device = self.dev})
      local off = 0
      for _, p in ipairs(parts) do
        self.summaries:narrow(1, off + 1, p:numel()):copy(p)
        off = off + p:numel()
      end
      self.summary_sizes = {}
      for i, p in ipairs(parts) do self.summary_sizes[i] = p:numel() end
    end
  end)
  if ok then ok, err = pcall(g.finish, g) end
  if not ok then
    g:free()
    self.values, self.summaries = nil, nil
    return false, err
  end
  self.graph = g
  -- the summaries' pinned mirror: read while the next replay runs
  if self.summaries then self.mirror = core.cuda_mirror(self.summaries) end
  return true
end

-- The routing statistics of the replay whose mirror copy was started last, as
-- Model:routing_stats gives them.
function Step:_stats()
  local per = {}
  if not self.mirror then return per end
  local derive = require("moelab.model").derive_routing_stats
  local host = self.mirror:finish()
  local tokens = self.inputs[#self.inputs][1]:numel()
  local off = 0
  for i, l in ipairs(self.trainer.model:moe_layers()) do
    local n = self.summary_sizes[i]
    per[i] = derive(l:routing_stats_from(host:narrow(1, off + 1, n), tokens), i)
    off = off + n
  end
  return per
end

--- run(batches, lr, max_norm, accum, start_reads, finish_reads[, next_step]) -> values
-- read, routing statistics; or nil and why when the graph gave up (the caller runs the
-- step eagerly). next_step() -> the next step's batches and learning rate: that step's
-- replay is queued behind this one before the host waits for this one's values, so the
-- GPU does not idle while the host keeps the books (give it only when nothing must run
-- between the two steps: no evaluation, no checkpoint, not when the run would stop
-- should this step be skipped).
function Step:run(batches, lr, max_norm, accum, start_reads, finish_reads, next_step)
  if self.next_error then
    local why = self.next_error
    self.next_error = nil
    return nil, why
  end
  if not self.queued then
    local ok, why = self:_load(batches, accum)
    -- (quiet: nothing was captured yet and nothing failed, the run is eager from its start)
    if not ok then
      if self.cold_error then return nil, why .. "; the first capture had failed: " .. self.cold_error end
      return nil, why, not self.graph
    end
    self.trainer.optimizer:set_lr(lr)
    -- the update the graph holds reads the master as the optimizer keeps it (split, the default):
    -- put it so before capturing and before every launch, whatever read the values in between
    self:_prepare()
    if not self.graph then
      -- the first step is captured cold (no eager activations left cached beside the
      -- graph's pool); should that fail, one eager step sets up what the capture
      -- could not, and the next step tries once more
      local function eager()
        self.warm = true
        local _, stats, reads = self.queue(self.inputs, self.scale, max_norm, lr, start_reads, true)
        return finish_reads(reads), stats
      end
      if self.cold_error and not self.warm then return eager() end
      local captured, err = self:_capture(max_norm, lr)
      if not captured then
        if self.warm then return nil, "the capture failed: " .. tostring(err) end
        self.cold_error = tostring(err)
        return eager()
      end
      self:_probe()
    end
    self.graph:launch()
  end
  self.queued = false
  -- this step's values are copied out before anything else is queued behind it
  local reads = start_reads(self.values)
  if self.mirror then self.mirror:start() end
  if next_step then
    local nb, nlr = next_step()
    local ok, why = self:_load(nb, accum)
    if ok then
      self.trainer.optimizer:set_lr(nlr)
      self:_prepare()
      self.graph:launch()
      self.queued = true
    else
      self.next_error = why   -- told at the next step, which then runs eagerly
    end
  end
  return finish_reads(reads), self:_stats()
end

function Step:_prepare()
  local opt = self.trainer.optimizer
  if opt.prepare then opt:prepare() end
end

-- MOELAB_GRAPH_PROBE=K (diagnosis): K replays back to back right after the
-- capture, timed, on stderr: the step's GPU time without the host's turns.
-- (They train K extra steps on the capture's batch.)
function Step:_probe()
  local k = tonumber(os.getenv("MOELAB_GRAPH_PROBE") or "")
  if not k or k < 1 then return end
  self.graph:launch()
  core.synchronize(self.dev)
  local t0 = core.clock()
  for _ = 1, k do self.graph:launch() end
  core.synchronize(self.dev)
  io.stderr:write(string.format("# graph probe: %d replays back to back, %.3f ms each\n", k,
    (core.clock() - t0) / k * 1e3))
end

--- info() -> {nodes=, launches=, pool_bytes=} of the captured graph, or nil
function Step:info() return self.graph and self.graph:info() end

--- free(): the graph and its pool go; the layers and the optimizer back to their eager settings
-- Each part runs even when one before it fails (after a device fault, say);
-- the first failure is raised at the end.
function Step:free()
  local mirror, graph = self.mirror, self.graph
  self.graph, self.values, self.summaries, self.inputs, self.mirror, self.queued = nil, nil, nil, nil, nil, false
  local first_err
  local function try(f, ...)
    local ok, err = pcall(f, ...)
    if not ok and not first_err then first_err = err end
  end
  if mirror then try(mirror.free, mirror) end
  if graph then try(graph.free, graph) end
  mirror, graph = nil, nil   -- (a mirror's handle keeps its tensor's until collected)
  for _, l in ipairs(self.trainer.model:moe_layers()) do
    l:set_defer_routing(false)
    -- the captured forward's tensors hold the graph's pool: its statistics stay, they go
    try(l.release_last_forward, l)
  end
  local opt = self.trainer.optimizer
  if opt.set_device_state then try(opt.set_device_state, opt, false) end
  -- the tensors made during the capture hold the pool's segments until collected
  collectgarbage()
  if first_err then error(first_err, 0) end
end

return M
