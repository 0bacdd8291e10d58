-- moe.dist and moe.distributed: the single-process communicator, option
-- checking, the DeepSpeed config mapping, and (when mpirun is there) two-rank
-- jobs (collectives, data parallel == one process, ZeRO, expert parallel, a
-- rank leaving) and a four-rank job (expert parallel x data parallel).
local files = require "helpers.files"
teardown(files.cleanup)
local dist = moe.dist
local distributed = moe.distributed

local function err(fn, pat)
  local ok, e = pcall(fn)
  assert.is_false(ok, "expected an error matching " .. pat)
  assert.is_truthy(tostring(e):find(pat, 1, true), "error '" .. tostring(e) .. "' lacks '" .. pat .. "'")
end

local function small_model()
  return moe.MoEModel{vocab_size = 256, hidden_size = 16, num_layers = 1, num_heads = 2, num_experts = 4,
                      experts_per_token = 2, expert_intermediate_size = 16, seed = 5}
end

describe("moe.dist (one process)", function()
  it("initialises the single-process communicator", function()
    local info = dist.init()
    assert.are.equal("single", info.backend)
    assert.are.equal(0, dist.rank())
    assert.are.equal(1, dist.world_size())
    assert.are.equal(0, dist.local_rank())
    assert.is_true(dist.is_initialized())
    err(function() dist.init{backend = "mpi"} end, "already initialised with the single backend")
    err(function() dist.init{backnd = "x"} end, "unknown option 'backnd'")
  end)

  it("collectives are the identity on one rank", function()
    local t = moe.randn({3, 4}, {seed = 2})
    local before = t:to_table()
    assert.are.same(before, dist.all_reduce(t, "sum"):to_table())
    assert.are.same(before, dist.all_reduce(t, "avg", {bucket_mb = 1e-5}):to_table())
    assert.are.same(before, dist.broadcast(t, 0):to_table())
    local g = dist.all_gather(t)
    assert.are.same({1, 3, 4}, g:shape())
    assert.are.same(before, g:select(1, 1):to_table())
    assert.are.same(before, dist.reduce_scatter(t, "sum"):to_table())
    assert.are.same(before, dist.all_to_all_v(t, {3}, {3}):to_table())
    dist.barrier()
    local m = small_model()
    assert.are.equal(1, dist.set_expert_parallel(m.net, true))   -- one rank: nothing to split
    assert.are.equal(1, dist.set_expert_parallel(m.net, false))
    err(function() dist.set_expert_parallel(t) end, "layer")
    -- the all_gather dispatch's token count: whole numbers >= 0, or false
    assert.are.equal(1, dist.set_ep_gather(m.net, 4))
    assert.are.equal(1, dist.set_ep_gather(m.net, false))
    err(function() dist.set_ep_gather(m.net, -1) end, "whole number >= 0")
    err(function() dist.set_ep_gather(m.net, 2.5) end, "whole number >= 0")
    err(function() dist.set_ep_gather(m.net, "4") end, "tokens per rank or false")
    err(function() dist.set_ep_gather(t, 4) end, "layer")
    local d = moe.randn({4}, {seed = 1}):to("f64")
    assert.are.same(d:to_table(), dist.all_reduce(d, "avg"):to_table())
  end)

  it("splits communicators; collectives are methods of communicator objects", function()
    local w = dist.comm()
    assert.are.equal("single", w:backend())
    assert.are.equal(1, w:world_size())
    assert.are.equal(w, dist.host_comm())
    local c = dist.split(3)
    assert.are.equal(0, c:rank())
    assert.are.equal(1, c:size())
    assert.are.equal(0, c:local_rank())
    assert.are.equal(1, c:local_world_size())
    assert.is_truthy(tostring(c):find("Comm(single, rank 0 of 1)", 1, true))
    local cc = c:split(0, 5)
    assert.are.equal(1, cc:info().world_size)
    local t = moe.randn({3, 2}, {seed = 4})
    local before = t:to_table()
    assert.are.same(before, cc:all_reduce(t, "avg"):to_table())
    assert.are.same(before, cc:broadcast(t, 0):to_table())
    assert.are.same({1, 3, 2}, cc:all_gather(t):shape())
    assert.are.same(before, cc:reduce_scatter(t):to_table())
    assert.are.same(before, cc:all_to_all_v(t, {3}, {3}):to_table())
    cc:barrier()
    c = nil
    collectgarbage()   -- cc keeps its parent alive
    assert.are.same(before, cc:all_reduce(t):to_table())
    err(function() dist.split(-1) end, "color must be >= 0")
    err(function() w:split("x") end, "color")
    err(function() cc:broadcast(t, 1) end, "root 1 is not a rank")
    local m = small_model()
    assert.are.equal(1, dist.set_expert_parallel(m.net, cc))
    assert.are.equal(1, dist.expert_parallel_size(m.net))   -- one rank: nothing to split
    assert.are.equal(1, dist.set_expert_parallel(m.net, false))
    err(function() dist.set_expert_parallel(m.net, t) end, "true, false or a communicator")
  end)

  it("rejects bad arguments with clear errors", function()
    err(function() dist.all_reduce(moe.randn({2}), "max") end, "op must be \"sum\" or \"avg\"")
    err(function() dist.all_reduce(moe.tensor({1, 2}, {dtype = "i64"})) end, "reductions take f32 or f64")
    err(function() dist.all_reduce(moe.randn({2, 3}):transpose(1, 2)) end, "contiguous")
    err(function() dist.broadcast(moe.randn({2}), 1) end, "root 1 is not a rank")
    err(function() dist.all_reduce(nil) end, "tensor")
    err(function() dist.all_to_all_v(moe.randn({2}), {1, 1}, {1}) end, "one per rank")
    local net = small_model().net
    err(function() dist.set_grad_allreduce(net, true, "x") end, "options must be a table")
    err(function() dist.set_grad_allreduce(net, true, {op = "max"}) end, "op must be \"sum\" or \"avg\"")
    err(function() dist.set_grad_allreduce(net, true, {skip = {{5, 2}}}) end, "is not sorted, disjoint and within")
    err(function() dist.set_grad_allreduce(net, true, {skip = {{1}}}) end, "must be {lo, hi} with integer bounds")
  end)
end)

describe("moe.distributed.DistributedMoETrainer (one process)", function()
  it("trains like MoETrainer on one rank", function()
    local corpus = moe.data.corpus{seed = 7, num_bytes = 20000}
    local tr = distributed.DistributedMoETrainer{model = small_model(), progress = false}
    local res = tr:train{train_data = corpus, batch_size = 2, seq_len = 8, max_steps = 2, learning_rate = 1e-3}
    assert.are.equal(2, res.steps)
    assert.are.equal(1, res.world_size)
    assert.are.equal(2, res.global_batch_size)
  end)

  it("ZeRO-1 and ZeRO-2 on one rank train like MoETrainer", function()
    local corpus = moe.data.corpus{seed = 7, num_bytes = 20000}
    local o = {train_data = corpus, batch_size = 2, seq_len = 8, max_steps = 3, learning_rate = 1e-3}
    local ref = moe.MoETrainer{model = small_model(), progress = false, grad_clip = 0.05}
    local want = ref:train(o).history
    for _, zs in ipairs{1, 2} do
      local tr = distributed.DistributedMoETrainer{model = small_model(), progress = false, zero_stage = zs, grad_clip = 0.05}
      local got = tr:train(o).history
      for s = 1, 3 do assert.is_true(math.abs(got[s].loss - want[s].loss) <= 1e-5 * math.abs(want[s].loss)) end
    end
    err(function() require("moelab.core").adamw(small_model().net, {range = {3, 1}}) end, "0 <= lo <= hi")
  end)

  it("ZeRO makes its padding and slice buffers on the flat buffers' device and dtype", function()
    -- on a CUDA model, buffers made on the host would send the gradients and
    -- parameters through host memory and the host communicator
    local core = require "moelab.core"
    local zeros, made = core.zeros, {}
    core.zeros = function(shape, o)
      if debug.getinfo(2, "S").source:find("dist_zero.lua", 1, true) then made[#made + 1] = o or {} end
      return zeros(shape, o)
    end
    local ok, e = pcall(function()
      local corpus = moe.data.corpus{seed = 7, num_bytes = 20000}
      for _, zs in ipairs{1, 2} do
        local m = small_model()
        local tr = distributed.DistributedMoETrainer{model = m, progress = false, zero_stage = zs}
        tr:train{train_data = corpus, batch_size = 2, seq_len = 8, max_steps = 1, learning_rate = 1e-3}
      end
    end)
    core.zeros = zeros
    assert(ok, e)
    local values = small_model().net:flat_parameters()
    assert.is_true(#made >= 3)   -- ZeRO-1: a slice; ZeRO-2: a padded gradient buffer and a slice
    for _, o in ipairs(made) do
      assert.are.equal(values:device(), o.device)
      assert.are.equal(values:dtype(), o.dtype)
    end
  end)

  it("ZeRO: a save that cannot gather the optimizer state fails before writing, never writes zeros", function()
    local dir = files.tmpdir()
    local corpus = moe.data.corpus{seed = 7, num_bytes = 20000}
    local tr = distributed.DistributedMoETrainer{model = small_model(), progress = false, zero_stage = 1, run_dir = dir}
    tr:train{train_data = corpus, batch_size = 2, seq_len = 8, max_steps = 2, learning_rate = 1e-3, save_final = false}
    -- visualize_routing saves the run's checkpoint first (rank 0 alone), which needs m and v
    err(function() tr:visualize_routing() end, "call trainer:save_checkpoint() on every rank")
    assert.is_nil(io.open(dir .. "/checkpoint/model.safetensors"))
    tr:save_checkpoint()
    local ck = moe.io.safetensors.load(dir .. "/checkpoint/optimizer.safetensors")
    assert.is_true(ck.exp_avg_sq:sum():item() > 0)
    assert.is_nil(tr.inner.optimizer._full)   -- the full-size copies last only while the checkpoint is written
  end)

  it("validates parallel sizes and ZeRO", function()
    local m = small_model()
    err(function() distributed.DistributedMoETrainer{model = m, expert_parallel_size = 2} end, "expert_parallel_size = 2 must divide the world size 1")
    err(function() distributed.DistributedMoETrainer{model = m, expert_model_parallel_size = 2} end, "must divide the world size 1")
    err(function() distributed.DistributedMoETrainer{model = m, expert_parallel_size = 0} end, "positive integer")
    err(function() distributed.DistributedMoETrainer{model = m, data_parallel_size = 0.5} end, "data_parallel_size must be a positive integer")
    err(function() distributed.DistributedMoETrainer{model = m, zero_stage = 3} end, "ZeRO-3 (sharded parameters) is not implemented")
    err(function() distributed.DistributedMoETrainer{model = m, global_aux_loss = "yes"} end, "global_aux_loss must be true or false")
    err(function() distributed.DistributedMoETrainer{model = m, expert_parallel_dispatch = "alltoal"} end,
        'expert_parallel_dispatch must be "auto", "alltoall" or "allgather", got alltoal')
    err(function() distributed.DistributedMoETrainer{model = m, moe_token_dispatcher_type = "flex"} end,
        "expert_parallel_dispatch must be")
    -- one rank: no expert parallelism, so no dispatch to choose
    assert.is_nil(distributed.DistributedMoETrainer{model = m, moe_token_dispatcher_type = "allgather",
                                                    progress = false}.expert_parallel_dispatch)
    err(function() distributed.DistributedMoETrainer{model = m, zero_stage = 4} end, "zero_stage must be 0, 1 or 2")
    err(function() distributed.DistributedMoETrainer{model = m, world_size = 2} end, "this job has 1 rank")
    err(function() distributed.DistributedMoETrainer{model = m, data_parallel_size = 2} end, "must equal the world size 1")
    err(function() distributed.DistributedMoETrainer{model = m, tensor_model_parallel_size = 2} end, "must be 1")
    err(function() distributed.DistributedMoETrainer{model = m, colour = 1} end, "unknown option 'colour'")
    err(function() distributed.DistributedMoETrainer{model = m, clip_grad = 0.5, grad_clip = 1} end, "conflicts")
    err(function() distributed.DistributedMoETrainer{model = m, aux_loss_coef = -1} end, "DistributedMoETrainer")
    local tr = distributed.DistributedMoETrainer{model = m, world_size = 1, data_parallel_size = 1,
                                                 expert_model_parallel_size = 1, clip_grad = 0.5, progress = false}
    assert.are.equal(0.5, tr.inner.grad_clip)
    err(function() tr:train{max_steps = 1, lr = 1e-3, learning_rate = 2e-3, batch_fn = function() end} end, "conflicts")
  end)
end)

describe("expert sharding (one process)", function()
  it("a model keeps a slice of its experts, refuses a one-process forward, and takes them back", function()
    local m = small_model()
    local ids = moe.tensor({{1, 2, 3, 4}}, {dtype = "i64"})
    local want = m.net:forward(ids):to_table()
    local before = m.net:flat_parameters():clone()
    local experts, rest, n_experts = {}, {}, 0
    for _, e in ipairs(m.net:param_layout()) do
      if e.expert_total then
        assert.are.same({0, 4, 4}, {e.expert_first, e.expert_count, e.expert_total})
        experts[#experts + 1] = m.net:param(e.name):clone()
        n_experts = n_experts + e.numel
      else
        rest[e.name] = m.net:param(e.name):clone()
      end
    end
    assert.are.equal(3, #experts)   -- gate, up, down of the one MoE layer
    assert.is_nil(m.net:expert_shard())
    local total = m.net:num_params()
    m.net:set_expert_shard(1, 2)
    assert.are.same({first = 1, count = 2, total = 4}, m.net:expert_shard())
    assert.are.equal(total - n_experts / 2, m.net:num_params())
    assert.is_true(m.net:flat_parameters():numel() < before:numel())
    local k = 0
    for _, e in ipairs(m.net:param_layout()) do
      if e.expert_total then
        k = k + 1
        assert.are.same({1, 2}, {e.expert_first, e.expert_count})
        assert.is_true(m.net:param(e.name):equal(experts[k]:narrow(1, 2, 2)), e.name)
      else
        assert.is_true(m.net:param(e.name):equal(rest[e.name]), e.name)
      end
    end
    err(function() m.net:forward(ids) end, "holds only experts [1, 3) of 4")
    err(function() m:forward(ids) end, "trainer:gather_experts()")
    err(function() moe.MoETrainer{model = m, progress = false}:save_model(files.tmpname(".d")) end,
      "sharded under expert parallelism")
    err(function() m.net:set_expert_shard(0, 2) end, "not all held here")
    err(function() m.net:set_expert_shard(3, 2) end, "not within the 4 experts")
    err(function() m.net:set_expert_shard(0, 4, {experts[1]}) end, "values given")
    err(function() m.net:set_expert_shard(0, 4, {experts[1], experts[2], experts[1]:narrow(1, 1, 2)}) end,
      "value 3 for down_proj must be f32 [4, 16, 16]")
    assert.are.same({first = 1, count = 2, total = 4}, m.net:expert_shard())   -- refused requests change nothing
    -- with expert parallelism over one rank the layer still refuses: the other experts are nowhere
    err(function() dist.set_expert_parallel(m.net, true); m.net:forward(ids) end, "holds only experts")
    dist.set_expert_parallel(m.net, false)
    m.net:set_expert_shard(0, 4, experts)
    assert.is_nil(m.net:expert_shard())
    assert.is_true(m.net:flat_parameters():equal(before))
    assert.are.same(want, m.net:forward(ids):to_table())
    -- adapters on the experts do not shard
    moe.peft.MoELoRA{base_model = m, r = 2}
    err(function() m.net:set_expert_shard(0, 2) end, "LoRA adapters on the experts are not supported")
  end)

  it("DistributedMoETrainer: shard_experts is checked and needs expert parallelism", function()
    err(function() distributed.DistributedMoETrainer{model = small_model(), shard_experts = 1} end,
      "shard_experts must be true or false")
    local tr = distributed.DistributedMoETrainer{model = small_model(), shard_experts = true, progress = false}
    local c = tr:parameter_counts()
    assert.is_false(c.sharded)   -- one rank, no expert parallelism: nothing to shard
    assert.are.equal(c.total, c.per_rank)
    assert.are.equal(tr.model.net:num_params(), c.total)
    assert.are.equal(c.total, c.non_expert + c.experts_total)
    assert.are.equal(tr, tr:gather_experts())   -- a no-op
  end)
end)

describe("DeepSpeed configs", function()
  local full = {
    train_batch_size = 16, train_micro_batch_size_per_gpu = 4, gradient_accumulation_steps = 2,
    zero_optimization = {stage = 0, reduce_bucket_size = 5e7}, bf16 = {enabled = false},
    gradient_clipping = 0.5, steps_per_print = 5,
    optimizer = {type = "AdamW", params = {lr = 3e-4, betas = {0.9, 0.99}, eps = 1e-6, weight_decay = 0.05}},
    scheduler = {type = "WarmupCosineLR", params = {total_num_steps = 100, warmup_num_steps = 10,
                                                    warmup_type = "linear", cos_min_ratio = 0.1}},
  }
  it("maps onto trainer and train options", function()
    local c = distributed.from_deepspeed(full, 2)
    assert.are.same({batch_size = 4, gradient_accumulation_steps = 2, learning_rate = 3e-4, warmup_steps = 10,
                     lr_schedule = "cosine", min_lr_ratio = 0.1, max_steps = 100}, c.train)
    assert.are.same({betas = {0.9, 0.99}, eps = 1e-6, weight_decay = 0.05, grad_clip = 0.5, log_every = 5}, c.trainer)
    assert.are.equal(0, c.zero_stage)
    assert.is_true(math.abs(c.bucket_mb - 5e7 * 4 / 2 ^ 20) < 1e-9)
    local d = distributed.from_deepspeed({train_batch_size = 8}, 2)
    assert.are.same({batch_size = 4, gradient_accumulation_steps = 1}, d.train)
    local w = distributed.from_deepspeed({train_micro_batch_size_per_gpu = 2, scheduler = {type = "WarmupLR",
      params = {warmup_min_lr = 0, warmup_max_lr = 1e-3, warmup_num_steps = 5, warmup_type = "linear"}}}, 1)
    assert.are.equal("constant", w.train.lr_schedule)
    assert.are.equal(1e-3, w.train.learning_rate)
  end)

  it("reports unknown and unsupported keys", function()
    local f = distributed.from_deepspeed
    err(function() f({wall_clock_breakdown = true}) end, "unknown or unsupported key 'wall_clock_breakdown'")
    err(function() f({zero_optimization = {stage = 2, overlap_comm = true}}) end, "'overlap_comm'")
    err(function() f({optimizer = {type = "Lamb"}}) end, "only AdamW")
    err(function() f({optimizer = {type = "AdamW", params = {lr = 1, torch_adam = true}}}) end, "'torch_adam'")
    err(function() f({fp16 = {enabled = true}}) end, "fp16.enabled = true is not supported")
    assert.are.equal("bf16", f({bf16 = {enabled = true}}).trainer.precision)
    assert.is_nil(f({bf16 = {enabled = false}}).trainer.precision)
    err(function() distributed.DistributedMoETrainer{model = small_model(), zero_stage = 1, precision = "bf16"} end,
      "precision = \"bf16\" is not supported yet")
    err(function() f({scheduler = {type = "OneCycle"}}) end, "OneCycle is not supported")
    err(function() f({scheduler = {type = "WarmupLR", params = {warmup_num_steps = 5}}}) end, "warmup_type must be \"linear\"")
    err(function() f({train_batch_size = 10, train_micro_batch_size_per_gpu = 4, gradient_accumulation_steps = 1}, 2) end,
      "train_batch_size 10 !=")
    err(function() f({train_batch_size = 6, train_micro_batch_size_per_gpu = 4}, 1) end, "not a multiple")
    err(function() distributed.DistributedMoETrainer{model = small_model(), config = {zero_optimization = {stage = 3}}} end,
      "ZeRO-3")
    err(function() distributed.DistributedMoETrainer{model = small_model(), config = "/nonexistent/ds.json"} end, "cannot read")
  end)

  it("reads a JSON file and feeds train()", function()
    local path = files.tmpname()
    local fh = assert(io.open(path, "w"))
    fh:write('{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "optimizer": ',
             '{"type": "AdamW", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 0}}')
    fh:close()
    local corpus = moe.data.corpus{seed = 7, num_bytes = 20000}
    local tr = distributed.DistributedMoETrainer{model = small_model(), config = path, progress = false}
    os.remove(path)
    local res = tr:train{train_data = corpus, seq_len = 8, max_steps = 1}
    assert.are.equal(2, res.global_batch_size)
    assert.are.equal(1e-3, tr.inner.base_lr)
  end)
end)

describe("jobs under mpirun", function()
  local function find_mpirun()
    local p = io.popen("command -v mpirun 2>/dev/null")
    local path = p:read("*l")
    p:close()
    return path ~= "" and path or nil
  end
  local mpirun = find_mpirun()
  local bin = os.getenv("MOELAB_BIN") or "./moelab"
  local function run(args, np, env)
    local p = io.popen(string.format("%s timeout 60 %s --oversubscribe --allow-run-as-root -np %d %s %s 2>&1; echo \"rc=$?\"",
                                     env or "", mpirun, np or 2, bin, args))
    local out = p:read("*a")
    p:close()
    return out, tonumber(out:match("rc=(%d+)%s*$"))
  end

  it("collectives, and data parallel reproduces one process with twice the accumulation", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/dp_check.lua check")
    assert.is_truthy(out:find("DP_OK 0", 1, true), out)
    assert.is_truthy(out:find("DP_OK 1", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("ZeRO-1 and ZeRO-2 reproduce data parallel, and a ZeRO-2 checkpoint resumes in one process", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/zero_check.lua")
    assert.is_truthy(out:find("ZERO_OK 0", 1, true), out)
    assert.is_truthy(out:find("ZERO_OK 1", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("ZeRO-1 and ZeRO-2 checkpoints hold the true optimizer state after a resume with nothing to train or a skipped last step; no gather with save_final = false", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/zero_resume_check.lua")
    assert.is_truthy(out:find("ZERO_RESUME_OK 0", 1, true), out)
    assert.is_truthy(out:find("ZERO_RESUME_OK 1", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("expert parallelism over 2 ranks (also with ZeRO-2) reproduces one process with twice the accumulation", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/ep_check.lua")
    assert.is_truthy(out:find("EP_OK 0", 1, true), out)
    assert.is_truthy(out:find("EP_OK 1", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("expert parallelism with one row per choice (the exchange expert choice uses) reproduces one process too", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    -- the default moves one row per token and owning rank; this keeps the other exchange under test
    local out, rc = run("tests/dist/ep_check.lua", 2, "MOELAB_EP_EXCHANGE=assignments")
    assert.is_truthy(out:find("EP_OK 0", 1, true), out)
    assert.is_truthy(out:find("EP_OK 1", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("expert parallelism by all-to-all of token rows (the trainer's all_gather turned off) reproduces one process", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    -- the trainer gathers every token at expert_parallel_size 2; this keeps the token rows under test in training
    local out, rc = run("tests/dist/ep_check.lua", 2, "MOELAB_EP_EXCHANGE=tokens")
    assert.is_truthy(out:find("EP_OK 0", 1, true), out)
    assert.is_truthy(out:find("EP_OK 1", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("recipes/expert_parallel.lua trains over 2 ranks with the all_gather dispatch and its loss falls", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("recipes/expert_parallel.lua 12")
    assert.is_truthy(out:find("expert_parallel_size 2 x data_parallel_size 1, dispatch allgather", 1, true), out)
    local first, last = out:match("loss ([%d.]+) %-> ([%d.]+) over 12 steps")
    assert.is_truthy(first and tonumber(last) < tonumber(first), out)
    assert.is_truthy(out:find("held-out perplexity", 1, true), out)
    assert.are.equal(0, rc, out)
  end)

  it("a misspelt MOELAB_EP_EXCHANGE is an error naming the accepted values", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/ep_check.lua", 2, "MOELAB_EP_EXCHANGE=assignment")
    assert.is_truthy(out:find('MOELAB_EP_EXCHANGE is "assignment", expected "tokens" or "assignments"', 1, true), out)
    assert.are_not.equal(0, rc, out)
  end)

  it("EP = 2 x DP = 2 on 4 ranks reproduces one process with 4x the accumulation; its checkpoint loads in one process", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/epdp_check.lua", 4)
    for r = 0, 3 do assert.is_truthy(out:find("EPDP_OK " .. r, 1, true), out) end
    assert.are.equal(0, rc, out)
  end)

  it("sharded experts (EP = 2): one rank's experts per rank, one process's results and checkpoints", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/epshard_check.lua")
    for r = 0, 1 do assert.is_truthy(out:find("EPSHARD_OK " .. r, 1, true), out) end
    assert.are.equal(0, rc, out)
  end)

  it("sharded experts under EP = 2 x DP = 2 on 4 ranks: one process's results and checkpoints", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/epshard_check.lua", 4)
    for r = 0, 3 do assert.is_truthy(out:find("EPSHARD_OK " .. r, 1, true), out) end
    assert.are.equal(0, rc, out)
  end)

  it("run_dir on one rank only is refused on every rank at construction (saves are collective)", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local out, rc = run("tests/dist/rundir_check.lua")
    for r = 0, 1 do assert.is_truthy(out:find("RUNDIR_OK " .. r, 1, true), out) end
    assert.are.equal(0, rc, out)
  end)

  it("a rank that leaves makes the other fail, naming it, instead of hanging", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local t0 = moe.clock()
    local out, rc = run("tests/dist/dp_check.lua exit_early")
    local secs = moe.clock() - t0
    assert.is_truthy(out:find("EXIT_EARLY_ERROR", 1, true), out)
    assert.is_truthy(out:find("rank 1 has left", 1, true), out)
    assert.are_not.equal(0, rc)
    assert.is_true(secs < 20, "took " .. secs .. " s")
  end)

  it("moelab --nproc runs the ranks through mpirun", function()
    if not mpirun then pending("no mpirun on PATH"); return end
    if not dist.have_mpi() then pending("built without MPI"); return end
    local p = io.popen(bin .. [[ --nproc 2 -e 'io.write("R", moe.dist.rank(), "/", moe.dist.world_size(), "\n")' 2>&1; echo "rc=$?"]])
    local out = p:read("*a")
    p:close()
    assert.is_truthy(out:find("R0/2", 1, true), out)
    assert.is_truthy(out:find("R1/2", 1, true), out)
    assert.is_truthy(out:find("rc=0", 1, true), out)
  end)
end)
