-- Parameter-efficient fine-tuning: per-expert LoRA on the expert banks
-- (moe.peft.MoELoRA) and task-conditioned routing (TaskAdaptiveMoE).
local moe = require "moelab"
local core = moe.core
local gc = require "helpers.gradcheck"
local files = require "helpers.files"
teardown(files.cleanup)
local peft = moe.peft or require "moelab.peft"
local TaskAdaptiveMoE = (moe.finetuning and moe.finetuning.TaskAdaptiveMoE) or require("moelab.task_adaptive").TaskAdaptiveMoE

local corpus = moe.data.corpus{seed = 5, num_bytes = 40000}

local function small(extra)
  local o = {vocab_size = 256, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 4,
             experts_per_token = 2, expert_intermediate_size = 12, seed = 21}
  for k, v in pairs(extra or {}) do o[k] = v end
  return moe.MoEModel(o)
end

local ids = moe.tensor({{1, 5, 9, 200, 17, 33, 4, 8}, {250, 3, 3, 70, 11, 90, 6, 2}}, {dtype = "i64"})

local function max_diff(a, b) return (a - b):abs():max():item() end

local function snapshot(model)
  local s = {}
  for _, p in ipairs(model:parameters()) do s[p.name] = p.value:clone() end
  return s
end

-- B starts at zero: give every adapter tensor random values so gradients and merges mean something
local function randomize_adapters(lora, seed)
  for i, p in ipairs(lora:parameters()) do
    p.value:copy(moe.randn(p.value:shape(), {seed = seed + i, std = 0.3}))
  end
end

describe("MoELoRA", function()
  it("starts from zero B: the adapted model's logits equal the base model's exactly", function()
    local m = small()
    local base = m:forward(ids).logits
    local lora = peft.MoELoRA{base_model = m, r = 4, lora_alpha = 8,
                              target_modules = {"expert_fc1", "expert_fc2", "q_proj", "v_proj"}}
    assert.are.equal(0, max_diff(base, m:forward(ids).logits))
    local names = {}
    for _, p in ipairs(lora:parameters()) do names[p.name] = p.value:shape() end
    assert.are.same({4, 4, 16}, names["layers.0.mlp.experts.gate_proj_lora_A"])
    assert.are.same({4, 12, 4}, names["layers.0.mlp.experts.up_proj_lora_B"])
    assert.are.same({4, 4, 12}, names["layers.1.mlp.experts.down_proj_lora_A"])
    assert.are.same({4, 16, 4}, names["layers.1.mlp.experts.down_proj_lora_B"])
    assert.are.same({4, 16}, names["layers.0.self_attn.q_proj.lora_A"])
    assert.are.same({16, 4}, names["layers.1.self_attn.v_proj.lora_B"])
    assert.is_nil(names["layers.0.self_attn.k_proj.lora_A"])
    -- the A matrices are random, the B matrices zero
    assert.is_true(m.net:param("layers.0.mlp.experts.gate_proj_lora_A"):abs():max():item() > 0)
    assert.are.equal(0, m.net:param("layers.0.mlp.experts.gate_proj_lora_B"):abs():max():item())
    -- per layer: bank (A, B) pairs 3 x 448, q_proj and v_proj 2 x (64 + 64)
    assert.are.equal(2 * (3 * 448 + 2 * 128), lora:num_params())
  end)

  it("one shared pair when expert_wise_adaptation = false", function()
    local m = small()
    local lora = peft.MoELoRA{base_model = m, r = 2, target_modules = {"expert_fc2"}, expert_wise_adaptation = false}
    local ps = lora:parameters()
    assert.are.equal(4, #ps)
    assert.are.same({1, 2, 12}, m.net:param("layers.0.mlp.experts.down_proj_lora_A"):shape())
    assert.are.same({1, 16, 2}, m.net:param("layers.0.mlp.experts.down_proj_lora_B"):shape())
  end)

  it("shows up in the layer description", function()
    local m = small()
    peft.MoELoRA{base_model = m, r = 3, target_modules = {"expert_fc1"}}
    local bank
    for _, l in ipairs(m:moe_layers()) do
      for _, c in ipairs(l:children()) do if c:kind() == "ExpertBank" then bank = c end end
    end
    assert.truthy(tostring(bank):find("LoRA r=3", 1, true))
  end)

  describe("gradients inside the MoE block", function()
    local x = moe.randn({2, 3, 6}, {seed = 3})
    local function check(what, block_opts, lora_opts)
      local o = {hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5, seed = 11}
      for k, v in pairs(block_opts or {}) do o[k] = v end
      local m = moe.nn.MoE(o)
      local n = core.lora_attach(m, "experts", lora_opts)
      assert.is_true(n > 0)
      m:to("cpu")   -- re-flatten the block's parameters with the adapters
      local k = 0
      for _, p in ipairs(m:parameters()) do
        if peft.is_lora_param(p.name) then
          k = k + 1
          p.value:copy(moe.randn(p.value:shape(), {seed = 40 + k, std = 0.5}))
        end
      end
      assert.is_true(k > 0)
      local r = gc.upstream(m:forward(x), 5)
      local function loss() return gc.dot(m:forward(x), r) + 0.3 * m:aux_loss():item() end
      m:zero_grad()
      local tape = moe.Tape()
      local y = m:forward(x, tape)
      tape:backward(tape:add(tape:sum(tape:mul(y, r)), tape:scale(m:aux_loss(), 0.3)))
      local go = {eps = 1e-3, atol = 3e-3, rtol = 3e-2}
      gc.check(what .. " d/dx", x, tape:grad(x), loss, go)
      for _, p in ipairs(m:parameters()) do gc.check(what .. " d/d" .. p.name, p.value, p.grad, loss, go) end
    end
    it("per-expert adapters on gate, up and down (SwiGLU)", function()
      check("per-expert", nil, {r = 3, alpha = 6, expert_wise = true, seed = 1})
    end)
    it("one shared adapter pair", function()
      check("shared", nil, {r = 2, alpha = 3, expert_wise = false, seed = 2})
    end)
    it("GELU experts, down projection only", function()
      check("gelu", {activation = "gelu"}, {r = 2, alpha = 2, targets = {"down_proj"}, seed = 3})
    end)
    it("plain LoRA on a Linear layer", function()
      local lin = moe.nn.Linear(5, 4, {seed = 9})
      core.lora_attach(lin, "", {r = 2, alpha = 4, seed = 4})
      lin:to("cpu")
      lin:param("lora_B"):copy(moe.randn({4, 2}, {seed = 8}))
      local xl = moe.randn({3, 5}, {seed = 7})
      local r = gc.upstream(lin:forward(xl), 6)
      local function loss() return gc.dot(lin:forward(xl), r) end
      lin:zero_grad()
      local tape = moe.Tape()
      tape:backward(tape:sum(tape:mul(lin:forward(xl, tape), r)))
      gc.check("linear d/dx", xl, tape:grad(xl), loss)
      for _, p in ipairs(lin:parameters()) do gc.check("linear d/d" .. p.name, p.value, p.grad, loss) end
    end)
    it("refuses a backward after the adapters changed", function()
      local m = moe.nn.MoE{hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5, seed = 11}
      local tape = moe.Tape()
      local y = m:forward(x, tape)
      core.lora_attach(m, "experts", {r = 2})
      m:to("cpu")
      local ok, err = pcall(tape.backward, tape, tape:sum(y))
      assert.is_false(ok)
      assert.truthy(tostring(err):find("between forward and backward", 1, true))
    end)
  end)

  it("training only the adapters lowers the loss and leaves the base weights bit-identical", function()
    local m = small()
    local before = snapshot(m)
    local lora = peft.MoELoRA{base_model = m, r = 4, lora_alpha = 8, target_modules = {"expert_fc1", "expert_fc2"}}
    local train_ds = corpus
    local trainer = lora:trainer{aux_loss_coef = 0.01, progress = false, weight_decay = 0}
    local first = trainer:evaluate(train_ds, {batches = 2, batch_size = 4, seq_len = 16}).loss
    local res = trainer:train{train_data = train_ds, batch_size = 4, seq_len = 16, learning_rate = 1e-2, max_steps = 30,
                              lr_schedule = "constant"}
    local last = trainer:evaluate(train_ds, {batches = 2, batch_size = 4, seq_len = 16}).loss
    assert.is_true(last < first - 0.05, string.format("loss %.4f -> %.4f", first, last))
    assert.are.equal(30, res.steps)
    for _, p in ipairs(m:parameters()) do
      if before[p.name] then
        assert.is_true(p.value:equal(before[p.name]), p.name .. " changed")
      else
        assert.is_true(peft.is_lora_param(p.name))
      end
    end
    -- B moved off zero
    assert.is_true(m.net:param("layers.0.mlp.experts.down_proj_lora_B"):abs():max():item() > 0)
  end)

  it("merge folds the adapters into the weights: logits preserved, adapters gone", function()
    for _, wise in ipairs{true, false} do
      local m = small()
      local lora = peft.MoELoRA{base_model = m, r = 4, lora_alpha = 8, expert_wise_adaptation = wise,
                                target_modules = {"expert_fc1", "expert_fc2", "q_proj", "o_proj"}}
      randomize_adapters(lora, 100)
      local base_w = m.net:param("layers.0.mlp.experts.up_proj"):clone()
      local adapted = m:forward(ids).logits
      local returned = lora:merge()
      assert.are.equal(m, returned)
      local merged = m:forward(ids).logits
      assert.is_true(max_diff(adapted, merged) < 1e-5, "max diff " .. max_diff(adapted, merged))
      assert.is_true(max_diff(base_w, m.net:param("layers.0.mlp.experts.up_proj")) > 1e-3)
      assert.are.equal(0, #lora:parameters())
      for _, p in ipairs(m:parameters()) do assert.is_false(peft.is_lora_param(p.name)) end
      local ok, err = pcall(lora.merge, lora)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("merged", 1, true))
      -- the merged model saves as a plain Hugging Face checkpoint
      local dir = files.tmpdir()
      moe.save_pretrained(m, dir, {model_type = "mixtral"})
    end
  end)

  it("unload removes the adapters without touching the weights", function()
    local m = small()
    local base = m:forward(ids).logits
    local lora = peft.MoELoRA{base_model = m, r = 2, target_modules = {"expert_fc1"}}
    randomize_adapters(lora, 7)
    assert.is_true(max_diff(base, m:forward(ids).logits) > 1e-4)
    lora:unload()
    assert.are.equal(0, max_diff(base, m:forward(ids).logits))
  end)

  it("save_pretrained writes PEFT's layout and from_pretrained reads it back", function()
    local m = small()
    local lora = peft.MoELoRA{base_model = m, r = 4, lora_alpha = 16, target_modules = {"expert_fc1", "expert_fc2", "q_proj"},
                              base_model_name_or_path = "allenai/OLMoE-1B-7B-0924"}
    randomize_adapters(lora, 300)
    local want = m:forward(ids).logits
    local dir = files.tmpdir()
    lora:save_pretrained(dir)
    local cfg = moe.io.json.decode(moe.io.read_file(dir .. "/adapter_config.json"))
    assert.are.equal("LORA", cfg.peft_type)
    assert.are.equal("CAUSAL_LM", cfg.task_type)
    assert.are.equal(4, cfg.r)
    assert.are.equal(16, cfg.lora_alpha)
    assert.are.equal("allenai/OLMoE-1B-7B-0924", cfg.base_model_name_or_path)
    assert.are.same({"down_proj", "gate_proj", "q_proj", "up_proj"}, cfg.target_modules)
    assert.is_true(cfg.moelab.expert_wise_adaptation)
    assert.truthy(cfg.moelab.note:find("per%-expert"))
    local info = moe.io.safetensors.info(dir .. "/adapter_model.safetensors")
    local t = moe.io.safetensors.load(dir .. "/adapter_model.safetensors")
    local count = 0
    for _ in pairs(t) do count = count + 1 end
    -- 2 layers x (3 projections x 4 experts + q_proj) x (A, B)
    assert.are.equal(2 * (3 * 4 + 1) * 2, count)
    assert.are.same({4, 16}, t["base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_A.weight"]:shape())
    assert.are.same({12, 4}, t["base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_B.weight"]:shape())
    assert.are.same({4, 12}, t["base_model.model.model.layers.1.mlp.experts.0.down_proj.lora_A.weight"]:shape())
    assert.are.same({16, 4}, t["base_model.model.model.layers.1.mlp.experts.0.down_proj.lora_B.weight"]:shape())
    assert.are.same({4, 16}, t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]:shape())
    assert.truthy(info)
    -- expert 3's slice of the stacked tensor
    local a3 = m.net:param("layers.0.mlp.experts.gate_proj_lora_A"):select(1, 4)
    assert.is_true(a3:equal(t["base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_A.weight"]))
    -- back into a fresh copy of the base model
    local m2 = small()
    local lora2 = peft.from_pretrained(m2, dir)
    assert.are.equal(4, lora2.r)
    assert.is_true(max_diff(want, m2:forward(ids).logits) < 1e-6)
    -- and into existing adapters
    local m3 = small()
    local lora3 = peft.MoELoRA{base_model = m3, r = 4, lora_alpha = 16, target_modules = {"expert_fc1", "expert_fc2", "q_proj"}}
    lora3:load(dir)
    assert.is_true(max_diff(want, m3:forward(ids).logits) < 1e-6)
    -- adapters of another shape are refused
    local m4 = small()
    local lora4 = peft.MoELoRA{base_model = m4, r = 4, lora_alpha = 16, target_modules = {"expert_fc1"}}
    local ok, err = pcall(lora4.load, lora4, dir)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("do not use", 1, true))
  end)

  it("round-trips shared adapters and uses Mixtral's names for a Mixtral model", function()
    local m = small()
    local lora = peft.MoELoRA{base_model = m, r = 2, target_modules = {"w1", "w2"}, expert_wise_adaptation = false}
    randomize_adapters(lora, 500)
    local want = m:forward(ids).logits
    local dir = files.tmpdir()
    lora:save_pretrained(dir, {model_type = "mixtral"})
    local cfg = moe.io.json.decode(moe.io.read_file(dir .. "/adapter_config.json"))
    assert.are.same({"w1", "w2"}, cfg.target_modules)
    assert.is_false(cfg.moelab.expert_wise_adaptation)
    local t = moe.io.safetensors.load(dir .. "/adapter_model.safetensors")
    local a0 = t["base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight"]
    local a2 = t["base_model.model.model.layers.0.block_sparse_moe.experts.2.w1.lora_A.weight"]
    assert.are.same({2, 16}, a0:shape())
    assert.is_true(a0:equal(a2))
    assert.truthy(t["base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight"])
    local m2 = small()
    peft.from_pretrained(m2, dir)
    assert.is_true(max_diff(want, m2:forward(ids).logits) < 1e-6)
  end)

  it("rejects bad configurations", function()
    local function err_of(opts)
      local ok, e = pcall(peft.MoELoRA, opts)
      assert.is_false(ok)
      return tostring(e)
    end
    assert.truthy(err_of{base_model = small(), target_modules = {"expert_fc3"}}:find("unknown target module 'expert_fc3'", 1, true))
    assert.truthy(err_of{base_model = small(), r = 0}:find("r must be a positive integer", 1, true))
    assert.truthy(err_of{base_model = small(), r = -2}:find("r must be a positive integer", 1, true))
    assert.truthy(err_of{base_model = small(), r = 2.5}:find("r must be a positive integer", 1, true))
    assert.truthy(err_of{base_model = small(), lora_alpha = 0}:find("lora_alpha", 1, true))
    assert.truthy(err_of{base_model = moe.nn.Linear(2, 2)}:find("base_model must be a moe.MoEModel", 1, true))
    assert.truthy(err_of{base_model = {}}:find("base_model must be a moe.MoEModel", 1, true))
    assert.truthy(err_of{}:find("base_model must be a moe.MoEModel, got nil", 1, true))
    assert.truthy(err_of{base_model = small(), rank = 4}:find("unknown option 'rank'", 1, true))
    -- a target the model lacks: GELU experts have no gate projection
    assert.truthy(err_of{base_model = small{activation = "gelu"}, target_modules = {"w1"}}:find("matches no layer", 1, true))
    -- twice on one model
    local m = small()
    local base = m:forward(ids).logits
    peft.MoELoRA{base_model = m, r = 2}
    assert.truthy(err_of{base_model = m, r = 2}:find("already has LoRA adapters", 1, true))
    assert.are.equal(0, max_diff(base, m:forward(ids).logits))
    -- the C layer checks too
    local ok, e = pcall(core.lora_attach, moe.nn.RMSNorm(4), "", {r = 2})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("ExpertBank or a Linear", 1, true))
    ok, e = pcall(core.lora_attach, moe.nn.Linear(3, 3), "", {r = 0})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("r must be positive", 1, true))
    ok, e = pcall(moe.MoETrainer, {model = small(), trainable = true})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("trainable must be a function", 1, true))
  end)
end)

describe("TaskAdaptiveMoE", function()
  it("conditions routing on the task", function()
    local m = small()
    local tam = TaskAdaptiveMoE{base_model = m, num_tasks = 3, init_std = 1.0, seed = 4}
    local r0, r1 = tam:router_logits(ids, 0), tam:router_logits(ids, 1)
    assert.are.equal(2, #r0)
    assert.is_true(max_diff(r0[1], r1[1]) > 1e-3)
    -- the assignments differ too
    local function experts(task)
      tam:forward(ids, {task = task})
      local _, e = m:moe_layers()[1]:assignments()
      return e:to_table()
    end
    assert.are_not.same(experts(0), experts(2))
    -- the bias is cleared after each call: the plain model routes as before
    local plain = m:forward(ids).logits
    assert.is_nil(m:moe_layers()[1]:router_input_bias())
    local m2 = small()
    assert.are.equal(0, max_diff(plain, m2:forward(ids).logits))
  end)

  it("sends gradients to the task embedding (and checks them by finite differences)", function()
    local m = small()
    local tam = TaskAdaptiveMoE{base_model = m, num_tasks = 3, init_std = 0.5, seed = 4}
    local targets = moe.tensor({{5, 9, 200, 17, 33, 4, 8, 1}, {3, 3, 70, 11, 90, 6, 2, 9}}, {dtype = "i64"})
    tam.task_net:zero_grad()
    local out = tam:forward(ids, {task = {1, 2}, targets = targets, aux_loss_coef = 0.1})
    out.tape:backward(out.total_loss)
    local w, g = tam.task_net:param("weight"), tam.task_net:grad("weight")
    assert.are.equal(0, g:select(1, 1):abs():max():item())      -- task 0 unused
    assert.is_true(g:select(1, 2):abs():max():item() > 0)
    assert.is_true(g:select(1, 3):abs():max():item() > 0)
    local function loss()
      return tam:forward(ids, {task = {1, 2}, targets = targets, aux_loss_coef = 0.1}).total_loss:item()
    end
    gc.check("task embedding", w, g, loss, {eps = 1e-3, atol = 2e-3, rtol = 5e-2, max_checks = 24})
  end)

  it("a bias of the wrong shape is refused", function()
    local l = small():moe_layers()[1]
    local ok, e = pcall(l.set_router_input_bias, l, moe.zeros({3, 5}))
    assert.is_false(ok)
    assert.truthy(tostring(e):find("expected last dim 16", 1, true))
    l:set_router_input_bias(moe.zeros({3, 1, 16}))
    ok, e = pcall(l.forward, l, moe.randn({2, 4, 16}))
    assert.is_false(ok)
    assert.truthy(tostring(e):find("broadcast", 1, true))
    l:set_router_input_bias(nil)
    l:forward(moe.randn({2, 4, 16}))
  end)

  it("adapt_to_task trains the task embedding and the routers only; generate decodes greedily", function()
    local m = small()
    local tam = TaskAdaptiveMoE{base_model = m, num_tasks = 2, task_embedding_dim = 8, seed = 1}
    local before = snapshot(m)
    local emb0 = tam.task_net:param("0.weight"):clone()
    local res = tam:adapt_to_task(1, corpus, {steps = 25, learning_rate = 1e-2, batch_size = 4, seq_len = 16})
    assert.are.equal(25, #res.losses)
    local early = (res.losses[1] + res.losses[2] + res.losses[3]) / 3
    local late = (res.losses[23] + res.losses[24] + res.losses[25]) / 3
    assert.is_true(late < early, string.format("%.4f -> %.4f", early, late))
    local router_moved = false
    for _, p in ipairs(m:parameters()) do
      local same = p.value:equal(before[p.name])
      if p.name:find("%.mlp%.gate%.") then
        if not same then router_moved = true end
      else
        assert.is_true(same, p.name .. " changed")
      end
    end
    assert.is_true(router_moved)
    local emb = tam.task_net:param("0.weight")
    assert.is_true(emb:select(1, 1):equal(emb0:select(1, 1)))      -- task 0's row untouched
    assert.is_false(emb:select(1, 2):equal(emb0:select(1, 2)))
    local out = tam:generate({72, 101, 108}, {task = 1, max_new_tokens = 5})
    assert.are.equal(8, #out)
    assert.are.same({72, 101, 108}, {out[1], out[2], out[3]})
    for i = 4, 8 do assert.is_true(out[i] >= 0 and out[i] < 256) end
    -- deterministic, and a tensor prompt works as well
    assert.are.same(out, tam:generate(moe.tensor({{72, 101, 108}}, {dtype = "i64"}), {task = 1, max_new_tokens = 5}))
  end)

  it("rejects bad arguments", function()
    local function err_of(fn, ...)
      local ok, e = pcall(fn, ...)
      assert.is_false(ok)
      return tostring(e)
    end
    assert.truthy(err_of(TaskAdaptiveMoE, {base_model = moe.nn.Linear(2, 2), num_tasks = 2}):find("base_model must be a moe.MoEModel", 1, true))
    assert.truthy(err_of(TaskAdaptiveMoE, {base_model = small(), num_tasks = 0}):find("num_tasks must be a positive integer", 1, true))
    local tam = TaskAdaptiveMoE{base_model = small(), num_tasks = 2}
    assert.truthy(err_of(tam.generate, tam, {1, 2}, {task = 2}):find("out of range", 1, true))
    assert.truthy(err_of(tam.generate, tam, {1, 2}, {}):find("task = <id>", 1, true))
    assert.truthy(err_of(tam.adapt_to_task, tam, 0, "not a dataset"):find("dataset", 1, true))
  end)
end)
