-- MoECostAnalyzer: exact parameter counts (moelab presets against the C
-- model, OLMoE-1B-7B and Mixtral-8x7B from their Hugging Face configs),
-- FLOPs, memory, the decode roofline, dense comparisons and argument errors.
local moe = require "moelab"
local MoECostAnalyzer = moe.MoECostAnalyzer or require("moelab.cost").MoECostAnalyzer
local files = require "helpers.files"
teardown(files.cleanup)

local function near(a, b, tol, what)
  if math.abs(a - b) > tol then error(string.format("%s: expected %.6g (+-%g), got %.6g", what or "value", b, tol, a), 2) end
end

local olmoe_cfg = {   -- allenai/OLMoE-1B-7B-0924 config.json (the keys that matter)
  model_type = "olmoe", hidden_size = 2048, intermediate_size = 1024, num_hidden_layers = 16,
  num_attention_heads = 16, num_key_value_heads = 16, num_experts = 64, num_experts_per_tok = 8,
  vocab_size = 50304, tie_word_embeddings = false, norm_topk_prob = false,
}
local mixtral_cfg = {   -- mistralai/Mixtral-8x7B-v0.1 config.json
  model_type = "mixtral", hidden_size = 4096, intermediate_size = 14336, num_hidden_layers = 32,
  num_attention_heads = 32, num_key_value_heads = 8, num_local_experts = 8, num_experts_per_tok = 2,
  vocab_size = 32000, tie_word_embeddings = false,
}

describe("MoECostAnalyzer parameters", function()
  it("reproduces OLMoE-1B-7B: 6.9B total, 1.3B active", function()
    local c = MoECostAnalyzer{model = olmoe_cfg}
    near(c.total_params / 1e9, 6.9, 0.1, "total")
    near(c.active_params / 1e9, 1.3, 0.1, "active")
    -- the exact sum: embeddings, and per layer attention + QK-norm + norms + router + 64 experts
    local h = 2048
    local per_layer = 4 * h * h + 2 * h + 2 * h + 64 * h + 64 * 3 * h * 1024
    assert.are.equal(2 * 50304 * h + h + 16 * per_layer, c.total_params)
    assert.are.equal(c.total_params - 16 * 56 * 3 * h * 1024, c.active_params)
  end)

  it("reproduces Mixtral-8x7B: 46.7B total, 12.9B active", function()
    local c = MoECostAnalyzer{model = mixtral_cfg}
    near(c.total_params / 1e9, 46.7, 0.1, "total")
    near(c.active_params / 1e9, 12.9, 0.1, "active")
  end)

  it("reads Qwen1.5-MoE-A2.7B (shared expert, q/k/v biases): 14.3B total, 2.7B active", function()
    local c = MoECostAnalyzer{model = {model_type = "qwen2_moe", hidden_size = 2048, intermediate_size = 5632,
      moe_intermediate_size = 1408, shared_expert_intermediate_size = 5632, num_hidden_layers = 24,
      num_attention_heads = 16, num_key_value_heads = 16, num_experts = 60, num_experts_per_tok = 4,
      vocab_size = 151936}}
    near(c.total_params / 1e9, 14.3, 0.1, "total")
    near(c.active_params / 1e9, 2.7, 0.1, "active")
  end)

  it("equals num_params and num_active_params for moelab presets and options", function()
    local base = {vocab_size = 100, hidden_size = 32, num_layers = 3, num_heads = 4, expert_intermediate_size = 16, seed = 1}
    for _, name in ipairs{"SwitchTransformer", "Mixtral", "GLaM", "OLMoE", "DeepSeek"} do
      local m = moe.arch[name](base)
      local c = MoECostAnalyzer{model = m}
      assert.are.equal(m:num_params(), c.total_params, name .. " total")
      assert.are.equal(m:num_active_params(), c.active_params, name .. " active")
      assert.are.equal(m:num_params(), c:num_params())
      -- the model's config table alone gives the same counts
      assert.are.equal(m:num_params(), MoECostAnalyzer{model = m.config}.total_params, name .. " from config")
    end
    local opts = {vocab_size = 50, hidden_size = 24, num_heads = 3, num_kv_heads = 1, num_layers = 3, num_experts = 6,
                  experts_per_token = 3, router = "noisy_topk", qk_norm = true, attention_bias = true,
                  tie_word_embeddings = true, num_shared_experts = 2, moe_layer_frequency = 2, intermediate_size = 40,
                  expert_intermediate_size = 12, activation = "gelu", seed = 1}
    local m = moe.MoEModel(opts)
    local c = MoECostAnalyzer{model = m}
    assert.are.equal(m:num_params(), c.total_params)
    assert.are.equal(m:num_active_params(), c.active_params)
    opts.seed = nil
    assert.are.equal(m:num_params(), MoECostAnalyzer{model = opts}.total_params, "from the options table")
    -- MoEModel's defaults apply to a config table too
    assert.are.equal(moe.MoEModel{}:num_params(), MoECostAnalyzer{model = {}}.total_params)
  end)

  it("counts custom experts from the model's layers", function()
    local m = moe.arch.Custom{vocab_size = 40, hidden_size = 16, num_layers = 2, num_heads = 2, seed = 1,
      expert = function() return moe.nn.Sequential(moe.nn.Linear(16, 8), moe.nn.ReLU(), moe.nn.Linear(8, 16)) end}
    local c = MoECostAnalyzer{model = m}
    assert.are.equal(m:num_params(), c.total_params)
    assert.are.equal(m:num_active_params(), c.active_params)
  end)

  it("reads a config.json path", function()
    local dir = files.tmpdir()
    moe.io.write_file_atomic(dir .. "/config.json", moe.io.json.encode(mixtral_cfg))
    assert.are.equal(MoECostAnalyzer{model = mixtral_cfg}.total_params, MoECostAnalyzer{model = dir}.total_params)
    assert.are.equal(MoECostAnalyzer{model = mixtral_cfg}.total_params,
      MoECostAnalyzer{model = dir .. "/config.json"}.total_params)
    os.execute("rm -rf '" .. dir .. "'")
  end)
end)

describe("MoECostAnalyzer FLOPs, memory and roofline", function()
  local mix = MoECostAnalyzer{model = mixtral_cfg, hardware_profile = "h100_80gb"}

  it("counts forward FLOPs as 2 x active matmul weights + attention, training as 3x", function()
    local h, v, L = 4096, 32000, 32
    local attn = h * 4096 + 2 * h * 1024 + 4096 * h
    local matmul = L * (attn + 8 * h + 2 * 3 * h * 14336) + v * h
    local s = 2048
    local fwd = 2 * matmul + 4 * L * 32 * 128 * (s + 1) / 2
    near(mix:flops_per_token(s), fwd, 1, "forward")
    near(mix:flops_per_token(s, {mode = "train"}), 3 * fwd, 3, "train")
    near(mix:flops_per_token(s, {mode = "decode"}), 2 * matmul + 4 * L * 32 * 128 * s, 1, "decode")
    -- about 2 x active parameters at short context (the rule of thumb)
    near(mix:flops_per_token(1) / (2 * mix.active_params), 1, 0.02, "2N")
  end)

  it("expected experts touched: U(B) = E (1 - (1 - k/E)^B)", function()
    near(mix:experts_touched(1), 2, 1e-12, "U(1) = k")
    near(mix:experts_touched(2), 8 * (1 - 0.75 ^ 2), 1e-12, "U(2)")
    near(mix:experts_touched(1000), 8, 1e-9, "U(large) = E")
  end)

  it("memory: 16 bytes a parameter for mixed-precision AdamW, activations and KV cache", function()
    local m = mix:memory{batch_size = 1, sequence_length = 1024}
    assert.are.equal(16 * mix.total_params, m.weights + m.gradients + m.optimizer + m.master_weights)
    assert.are.equal(mix:activation_bytes(1, 1024), m.activations)
    assert.is_false(m.fits)
    near(m.weights_gb, 2 * mix.total_params / 1e9, 1e-9, "weights in GB")
    local cpu = MoECostAnalyzer{model = mixtral_cfg, hardware_profile = "cpu"}
    local mc = cpu:memory{}
    assert.are.equal(0, mc.master_weights)
    assert.are.equal(16 * cpu.total_params, mc.weights + mc.gradients + mc.optimizer)
    local inf = mix:memory{batch_size = 4, sequence_length = 100, training = false}
    assert.are.equal(2 * 32 * 8 * 128 * 4 * 100 * 2, inf.kv_cache)
    assert.are.equal(inf.weights + inf.kv_cache, inf.total)
  end)

  it("decode at batch 1 is memory-bound and reads the active weights", function()
    local a = mix:analyze{batch_size = 1, sequence_length = 1}
    assert.are.equal("memory", a.bound)
    near(a.experts_touched, 2, 1e-12, "experts touched")
    -- active parameters less the embedding table (one row is read), in bf16, plus a tiny KV cache
    local expect = 2 * (mix.active_params - mixtral_cfg.vocab_size * 4096 + 4096) + 4 * 32 * 8 * 128 * 2
    near(a.bytes, expect, 1, "bytes")
    near(a.throughput, 1 / (a.bytes / 3.35e12), 1e-6, "tokens/s")
    near(a.memory_bandwidth_gb, a.bytes / 1e9, 1e-12, "GB per step")
    -- a large batch touches every expert; prefill of many tokens is compute-bound
    local big = mix:analyze{batch_size = 4096, sequence_length = 1}
    near(big.experts_touched, 8, 1e-9, "all experts")
    assert.are.equal("compute", mix:analyze{batch_size = 8, sequence_length = 4096, mode = "prefill"}.bound)
    assert.are.equal("compute", mix:analyze{batch_size = 8, sequence_length = 4096, mode = "train"}.bound)
    -- a faster memory system decodes faster
    local h200 = MoECostAnalyzer{model = mixtral_cfg, hardware_profile = "h200"}
    near(h200:analyze{}.throughput / mix:analyze{}.throughput, 4.8 / 3.35, 1e-9, "bandwidth ratio")
  end)

  it("profiles and overrides", function()
    local a100 = MoECostAnalyzer{model = olmoe_cfg, hardware_profile = "a100_80gb"}
    assert.are.equal(312e12, a100.hardware.peak_flops)
    assert.are.equal(2.0e12, a100.hardware.bandwidth)
    local custom = MoECostAnalyzer{model = olmoe_cfg, hardware_profile = "cpu", peak_flops = 2e12, bandwidth = 5e10}
    assert.are.equal(2e12, custom.hardware.peak_flops)
    assert.are.equal(5e10, custom.hardware.bandwidth)
    assert.are.equal("f32", custom.hardware.dtype)
    local measured = MoECostAnalyzer.measure_cpu{size = 128, bytes = 2 ^ 20}
    assert.is_true(measured.peak_flops > 0 and measured.bandwidth > 0)
  end)

  it("compares with dense models of equal active and equal total parameters", function()
    local cmp = mix:compare_with_dense{sequence_length = 2048}
    local router = 32 * 8 * 4096
    assert.are.equal(mix.active_params - router, cmp.equal_active.total_params)
    assert.are.equal(mix.total_params - router, cmp.equal_total.total_params)
    assert.are.equal(2 * 14336, cmp.equal_active.ffn_intermediate_size)
    near(cmp.compute_reduction, 3.6, 0.1, "Mixtral's FLOPs are ~3.6x fewer than a dense 46.7B")
    near(cmp.capacity_ratio, mix.total_params / mix.active_params, 1e-12, "capacity ratio")
    assert.is_true(cmp.flops_overhead > 0 and cmp.flops_overhead < 1e-3)
  end)
end)

describe("MoECostAnalyzer arguments", function()
  it("rejects bad arguments, naming the function and the argument", function()
    assert.has_error(function() MoECostAnalyzer() end,
      "MoECostAnalyzer: expected a table {model=, hardware_profile=}, got nil")
    assert.has_error(function() MoECostAnalyzer{} end,
      "MoECostAnalyzer: option 'model' is required (a moe.MoEModel or a config table)")
    assert.has_error(function() MoECostAnalyzer{model = olmoe_cfg, hardware_profile = "tpu"} end,
      'MoECostAnalyzer: unknown hardware_profile "tpu" (expected a100_80gb, cpu, h100_80gb, h200)')
    assert.has_error(function() MoECostAnalyzer{model = {model_type = "deepseek_v3", hidden_size = 8}} end)
    assert.has_error(function() MoECostAnalyzer{model = {model_type = "mixtral", hidden_size = 8}} end,
      "MoECostAnalyzer: the config has no 'vocab_size'")
    assert.has_error(function() MoECostAnalyzer{model = olmoe_cfg, hardware = "cpu"} end)
    local c = MoECostAnalyzer{model = olmoe_cfg}
    assert.has_error(function() c:analyze{batch_size = 0} end,
      "MoECostAnalyzer:analyze: option 'batch_size' must be >= 1, got 0")
    assert.has_error(function() c:analyze{mode = "serve"} end)
    assert.has_error(function() c:flops_per_token(0) end,
      "MoECostAnalyzer:flops_per_token: sequence_length must be a positive integer, got 0")
    assert.has_error(function() c.memory() end, "MoECostAnalyzer:memory: call it on a MoECostAnalyzer with ':'")
  end)
end)
