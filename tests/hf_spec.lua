-- Hugging Face checkpoints (moelab.hf): moe.from_pretrained / moe.save_pretrained
-- against tiny OLMoE, Mixtral and Qwen2-MoE checkpoints written by transformers
-- (tests/fixtures/make_hf_moe.py, which also recorded transformers' logits,
-- layer-0 router logits, loss and gradients in tests/fixtures/hf/NAME_reference.safetensors).
--
-- The check that transformers itself loads what save_pretrained writes runs
-- when a Python with torch and transformers is found ($MOELAB_HF_PYTHON, else
-- python3); otherwise it is pending.
local moe = require "moelab"
local mio = moe.io
local st = mio.safetensors

local FIX = "tests/fixtures/hf/"
local MODELS = {"olmoe", "mixtral", "qwen2_moe"}

local files = require "helpers.files"
local tmpdir = files.tmpdir
teardown(files.cleanup)

local function fails(pattern, f, ...)
  local ok, msg = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "', the call succeeded")
  msg = tostring(msg)
  assert(msg:find(pattern, 1, true), "error '" .. msg .. "' does not contain '" .. pattern .. "'")
  return msg
end

-- max |a - b| / max |b|
local function rel_err(a, b)
  assert.are.same(b:shape(), a:shape())
  local d = (a:contiguous() - b:contiguous()):abs():max():item()
  local m = b:abs():max():item()
  return d / math.max(m, 1e-30), d
end

local function reference(name) return st.load(FIX .. name .. "_reference.safetensors") end

-- transformers' loss: logits[:, :-1] against ids[:, 1:]; moelab: targets with the last position ignored
local function shifted_targets(ids)
  local rows = ids:to_table()
  for _, r in ipairs(rows) do
    for t = 1, #r - 1 do r[t] = r[t + 1] end
    r[#r] = -100
  end
  return moe.tensor(rows, {dtype = "i64"})
end

local function copy_file(src, dst)
  local i = assert(io.open(src, "rb"))
  local data = i:read("*a")
  i:close()
  local o = assert(io.open(dst, "wb"))
  o:write(data)
  o:close()
end

-- a copy of a fixture dir (single-file checkpoints) whose tensors pass through edit(list)
local function edited_copy(name, edit, cfg_edit)
  local d = tmpdir()
  if not name:find("/", 1, true) then name = FIX .. name end
  local cfg = mio.json.decode(mio.read_file(name .. "/config.json"))
  if cfg_edit then cfg_edit(cfg) end
  mio.write_file_atomic(d .. "/config.json", mio.json.encode(cfg, {indent = true}))
  local tensors = st.load(name .. "/model.safetensors")
  local list = {}
  for k, v in pairs(tensors) do list[#list + 1] = {k, v} end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  list = edit and edit(list) or list
  st.save(d .. "/model.safetensors", list, {format = "pt"})
  return d
end

local function hf_python()
  local py = os.getenv("MOELAB_HF_PYTHON") or "python3"
  local ok = os.execute(py .. " -c 'import torch, transformers' >/dev/null 2>&1")
  if ok == 0 or ok == true then return py end
  return nil
end

describe("moe.from_pretrained matches transformers", function()
  for _, name in ipairs(MODELS) do
    describe(name, function()
      local model, ref, out

      local function setup()
        if model then return end
        model = moe.from_pretrained(FIX .. name)
        ref = reference(name)
        out = model:forward(ref.ids, {targets = shifted_targets(ref.ids)})
      end

      it("loads with the config mapped", function()
        setup()
        assert.are.equal(name, model.hf.model_type)
        local c = model.config
        assert.are.equal(128, c.vocab_size)
        assert.are.equal(32, c.hidden_size)
        assert.are.equal("topk", c.router)
        assert.are.equal("softmax", c.router_score)
        if name == "olmoe" then
          assert.is_true(c.qk_norm)
          assert.is_false(c.renormalize)
          assert.are.equal(8, c.num_experts)
        elseif name == "mixtral" then
          assert.is_true(c.renormalize)
          assert.are.equal(16, c.head_dim)
          assert.are.equal(1e6, c.rope_theta)
        else
          assert.is_true(c.qkv_bias)
          assert.is_false(c.attention_bias)
          assert.is_true(c.shared_expert_gate)
          assert.is_true(c.tie_word_embeddings)
          assert.are.same({1}, c.mlp_only_layers)
          assert.are.equal(2, #model:moe_layers())
        end
      end)

      it("logits match to 1e-4 relative", function()
        setup()
        local r, d = rel_err(out.logits, ref.logits)
        print(string.format("# %s logits: max abs diff %.3g, relative %.3g", name, d, r))
        assert.is_true(r < 1e-4, string.format("relative error %.3g", r))
      end)

      it("layer 0 router logits match", function()
        setup()
        local rl = model:moe_layers()[1]:router_logits()
        local r, d = rel_err(rl, ref.router_logits_0)
        print(string.format("# %s router logits: max abs diff %.3g, relative %.3g", name, d, r))
        assert.is_true(r < 1e-4, string.format("relative error %.3g", r))
      end)

      it("the loss matches (mean CE over shifted tokens, no aux)", function()
        setup()
        local a, b = out.loss:item(), ref.loss:get(1)
        print(string.format("# %s loss: moelab %.7f transformers %.7f", name, a, b))
        assert.is_true(math.abs(a - b) / math.abs(b) < 1e-5)
      end)

      it("the gradient of the loss matches", function()
        setup()
        model:zero_grad()
        out.tape:backward(out.loss)
        local r, d = rel_err(model.net:grad("layers.0.mlp.gate.weight"), ref.grad_router_0)
        print(string.format("# %s d loss / d router(0): max abs diff %.3g, relative %.3g", name, d, r))
        assert.is_true(r < 1e-4, string.format("relative error %.3g", r))
        if ref.grad_shared_gate_0 then
          local r2, d2 = rel_err(model.net:grad("layers.0.mlp.shared_expert_gate.weight"), ref.grad_shared_gate_0)
          print(string.format("# %s d loss / d shared_expert_gate(0): max abs diff %.3g, relative %.3g", name, d2, r2))
          assert.is_true(r2 < 1e-4, string.format("relative error %.3g", r2))
        end
      end)

      it("save_pretrained then from_pretrained gives identical logits", function()
        setup()
        local d = tmpdir()
        moe.save_pretrained(model, d)
        local cfg = mio.json.decode(mio.read_file(d .. "/config.json"))
        assert.are.equal(name, cfg.model_type)
        local back = moe.from_pretrained(d)
        local a = model:forward(ref.ids).logits
        local b = back:forward(ref.ids).logits
        assert.are.equal(0, (a - b):abs():max():item())
        -- the names are transformers' own
        local names = {}
        for _, e in ipairs(st.info(d .. "/model.safetensors")) do names[e.name] = e.shape end
        local orig = st.info(FIX .. name .. (name == "qwen2_moe" and "/model.safetensors.index.json" or "/model.safetensors"))
        for _, e in ipairs(orig) do
          assert.is_truthy(names[e.name], "save_pretrained did not write " .. e.name)
          assert.are.same(e.shape, names[e.name])
          names[e.name] = nil
        end
        assert.are.same({}, names)
        os.execute("rm -rf '" .. d .. "'")
      end)
    end)
  end
end)

describe("moe.save_pretrained output loads in transformers", function()
  it("a fine-tuned model of each type gives the same logits there", function()
    local py = hf_python()
    if not py then pending("no python with torch + transformers (set MOELAB_HF_PYTHON)"); return end
    for _, name in ipairs(MODELS) do
      local model = moe.from_pretrained(FIX .. name)
      local ref = reference(name)
      -- two SGD steps, so the saved weights differ from the fixture's
      for _ = 1, 2 do
        model:zero_grad()
        local out = model:forward(ref.ids, {targets = shifted_targets(ref.ids)})
        out.tape:backward(out.loss)
        for _, p in ipairs(model:parameters()) do p.value:copy(p.value - p.grad * 0.05) end
      end
      local d = tmpdir()
      moe.save_pretrained(model, d)
      local mine = model:forward(ref.ids).logits
      st.save(d .. "/ids_logits.safetensors", {{"ids", ref.ids}, {"logits", mine}}, {})
      local script = table.concat({
        "import sys, torch",
        "from safetensors.torch import load_file",
        "from transformers import AutoModelForCausalLM",
        "d = sys.argv[1]",
        "m, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation='eager', output_loading_info=True)",
        "bad = [k for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys') if info.get(k)]",
        "assert not bad, {k: info[k] for k in bad}",
        "r = load_file(d + '/ids_logits.safetensors')",
        "with torch.no_grad(): lg = m(input_ids=r['ids']).logits",
        "print('%.6g' % ((lg - r['logits']).abs().max() / r['logits'].abs().max()).item())",
      }, "\n")
      local sf = d .. "/check.py"
      local fh = assert(io.open(sf, "w")); fh:write(script); fh:close()
      local p = io.popen(py .. " " .. sf .. " " .. d .. " 2>&1")
      local text = p:read("*a")
      p:close()
      local rel = tonumber(text:match("([%d%.e%-]+)%s*$"))
      assert.is_truthy(rel, name .. ": transformers failed: " .. text)
      print(string.format("# %s: transformers on the saved fine-tuned model, relative logit error %.3g", name, rel))
      assert.is_true(rel < 1e-4, name .. ": " .. text)
      os.execute("rm -rf '" .. d .. "'")
    end
  end)
end)

describe("Hugging Face layouts and configs", function()
  local base, ids
  local function setup()
    if base then return end
    ids = reference("olmoe").ids
    base = moe.from_pretrained(FIX .. "olmoe"):forward(ids).logits
  end

  local function fuse(list, transposed)
    -- experts.E.{gate,up,down}_proj.weight -> experts.gate_up_proj [E, 2I, H] (or [E, H, 2I]) + experts.down_proj
    local out, per = {}, {}
    for _, e in ipairs(list) do
      local pre, x, part = e[1]:match("^(model%.layers%.%d+%.mlp%.experts)%.(%d+)%.(%w+_proj)%.weight$")
      if pre then
        per[pre] = per[pre] or {}
        per[pre][part] = per[pre][part] or {}
        per[pre][part][tonumber(x) + 1] = e[2]
      else
        out[#out + 1] = e
      end
    end
    for pre, parts in pairs(per) do
      local E = #parts.gate_proj
      local I, H = parts.gate_proj[1]:shape()[1], parts.gate_proj[1]:shape()[2]
      local gu = transposed and moe.zeros({E, H, 2 * I}) or moe.zeros({E, 2 * I, H})
      local dn = moe.zeros({E, H, I})
      for e = 1, E do
        if transposed then
          gu:select(1, e):narrow(2, 1, I):copy(parts.gate_proj[e]:t())
          gu:select(1, e):narrow(2, I + 1, I):copy(parts.up_proj[e]:t())
        else
          gu:select(1, e):narrow(1, 1, I):copy(parts.gate_proj[e])
          gu:select(1, e):narrow(1, I + 1, I):copy(parts.up_proj[e])
        end
        dn:select(1, e):copy(parts.down_proj[e])
      end
      out[#out + 1] = {pre .. ".gate_up_proj", gu}
      out[#out + 1] = {pre .. ".down_proj", dn}
    end
    return out
  end

  it("accepts fused 3-D expert tensors (gate_up_proj [E, 2I, H] and [E, H, 2I])", function()
    -- I = 24, H = 32, so the two layouts cannot be confused (with H = 2I the
    -- loader takes transformers' own [E, 2I, H])
    local m = moe.arch.OLMoE{vocab_size = 64, hidden_size = 32, num_layers = 2, num_heads = 4, num_experts = 4,
      experts_per_token = 2, expert_intermediate_size = 24, seed = 9}
    local src = tmpdir()
    moe.save_pretrained(m, src, {model_type = "olmoe"})
    local x = moe.tensor({{3, 1, 4, 1, 5, 9}}, {dtype = "i64"})
    local want = m:forward(x).logits
    for _, tr in ipairs{false, true} do
      local d = edited_copy(src, function(l) return fuse(l, tr) end)
      local names = {}
      for _, e in ipairs(st.info(d .. "/model.safetensors")) do names[e.name] = e.shape end
      assert.are.same(tr and {4, 32, 48} or {4, 48, 32}, names["model.layers.0.mlp.experts.gate_up_proj"])
      local lg = moe.from_pretrained(d):forward(x).logits
      assert.are.equal(0, (lg - want):abs():max():item())
      os.execute("rm -rf '" .. d .. "'")
    end
    os.execute("rm -rf '" .. src .. "'")
  end)

  it("converts f16 checkpoints to f32", function()
    setup()
    local d = edited_copy("olmoe", function(l)
      for _, e in ipairs(l) do e[2] = e[2]:to("f16") end
      return l
    end)
    local info = st.info(d .. "/model.safetensors")
    assert.are.equal("f16", info[1].dtype)
    local lg = moe.from_pretrained(d):forward(ids).logits
    local r = rel_err(lg, base)
    assert.is_true(r < 2e-2, "f16 weights moved the logits by " .. r)
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("reads the legacy rope_theta form and num_experts for Mixtral", function()
    local mref = reference("mixtral")
    local want = moe.from_pretrained(FIX .. "mixtral"):forward(mref.ids).logits
    local d = edited_copy("mixtral", nil, function(c)
      c.rope_theta, c.rope_parameters = c.rope_parameters.rope_theta, nil
      c.num_experts, c.num_local_experts = c.num_local_experts, nil
    end)
    local m = moe.models.Mixtral.from_pretrained(d)
    assert.are.equal(1e6, m.config.rope_theta)
    assert.are.equal(0, (m:forward(mref.ids).logits - want):abs():max():item())
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("maps decoder_sparse_step and mlp_only_layers (qwen2_moe)", function()
    local hf = require "moelab.hf"
    local cfg = mio.json.decode(mio.read_file(FIX .. "qwen2_moe/config.json"))
    cfg.num_hidden_layers, cfg.decoder_sparse_step, cfg.mlp_only_layers = 6, 2, {3}
    local o = hf.config_from_hf(cfg)
    local m = moe.MoEModel(o)
    -- (i + 1) % 2 == 0 -> 1, 3, 5; minus 3
    assert.are.equal(2, #m:moe_layers())
    assert.is_truthy(m.net:param("layers.1.mlp.gate.weight"))
    assert.is_truthy(m.net:param("layers.3.mlp.gate_proj.weight"))
    assert.is_truthy(m.net:param("layers.5.mlp.shared_expert_gate.weight"))
    -- and back: the HF config lists the dense layer the step alone would have made MoE
    local back = hf.config_to_hf(m, "qwen2_moe")
    assert.are.equal(2, back.decoder_sparse_step)
    assert.are.same({3}, back.mlp_only_layers)
  end)

  it("model options added for these architectures check their arguments", function()
    local a = moe.nn.Attention{hidden_size = 16, num_heads = 2, qkv_bias = true}
    local names = {}
    for _, p in ipairs(a:parameters()) do names[p.name] = true end
    assert.is_true(names["q_proj.bias"] and names["k_proj.bias"] and names["v_proj.bias"])
    assert.is_nil(names["o_proj.bias"])
    local base = {vocab_size = 16, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 2,
      experts_per_token = 1, expert_intermediate_size = 8, intermediate_size = 8}
    local function with(extra)
      local o = {}
      for k, v in pairs(base) do o[k] = v end
      for k, v in pairs(extra) do o[k] = v end
      return o
    end
    fails("mlp_only_layers[1] must be a 0-based layer id below num_layers (2), got 2", moe.MoEModel, with{mlp_only_layers = {2}})
    fails("must be a list of 0-based layer ids", moe.MoEModel, with{mlp_only_layers = 1})
    fails("shared_expert_gate needs a shared expert", moe.MoEModel, with{shared_expert_gate = true})
    local m = moe.MoEModel(with{mlp_only_layers = {0}})
    assert.are.equal(1, #m:moe_layers())
    assert.is_nil(m:moe_layers()[1]:router_logits())
    m:forward(moe.tensor({{1, 2, 3}}, {dtype = "i64"}))
    assert.are.same({3, 2}, m:moe_layers()[1]:router_logits():shape())
  end)

  it("moe.from_pretrained on a moelab checkpoint is moe.load", function()
    local m = moe.arch.Mixtral{vocab_size = 64, hidden_size = 32, num_layers = 1, num_heads = 4, num_kv_heads = 2,
      num_experts = 4, expert_intermediate_size = 16, seed = 3}
    local d = tmpdir()
    require("moelab.checkpoint").save_model(m, d)
    local x = moe.tensor({{1, 2, 3, 4}}, {dtype = "i64"})
    local back = moe.from_pretrained(d)
    assert.are.equal(0, (back:forward(x).logits - m:forward(x).logits):abs():max():item())
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("saves a model built in moelab as Mixtral and as Qwen2-MoE", function()
    local x = moe.tensor({{1, 2, 3, 4, 5}}, {dtype = "i64"})
    local m = moe.arch.Mixtral{vocab_size = 64, hidden_size = 32, num_layers = 2, num_heads = 4, num_kv_heads = 2,
      num_experts = 4, expert_intermediate_size = 16, seed = 3}
    local d = tmpdir()
    moe.models.Mixtral.save_pretrained(m, d)
    local back = moe.from_pretrained(d)
    assert.are.equal("mixtral", back.hf.model_type)
    assert.are.equal(0, (back:forward(x).logits - m:forward(x).logits):abs():max():item())
    os.execute("rm -rf '" .. d .. "'")
    local q = moe.MoEModel{vocab_size = 64, hidden_size = 32, num_layers = 3, num_heads = 4, num_kv_heads = 2,
      num_experts = 4, experts_per_token = 2, expert_intermediate_size = 16, intermediate_size = 40,
      num_shared_experts = 1, shared_intermediate_size = 24, shared_expert_gate = true, qkv_bias = true,
      first_dense_layers = 1, renormalize = false, seed = 5}
    d = tmpdir()
    moe.save_pretrained(q, d, {model_type = "qwen2_moe"})
    local cfg = mio.json.decode(mio.read_file(d .. "/config.json"))
    assert.are.same({0}, cfg.mlp_only_layers)
    back = moe.models.QwenMoE.from_pretrained(d)
    assert.are.equal(0, (back:forward(x).logits - q:forward(x).logits):abs():max():item())
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("refuses to save what the target architecture cannot express", function()
    local m = moe.arch.DeepSeek{vocab_size = 64, hidden_size = 32, num_layers = 2, num_heads = 4,
      num_experts = 4, experts_per_token = 2, seed = 1}
    local msg = fails("cannot be written as qwen2_moe", moe.save_pretrained, m, tmpdir(), {model_type = "qwen2_moe"})
    assert.is_truthy(msg:find("sigmoid", 1, true))
    assert.is_truthy(msg:find("aux_free", 1, true))
    local o = moe.arch.OLMoE{vocab_size = 64, hidden_size = 32, num_layers = 1, num_heads = 4, num_experts = 4,
      experts_per_token = 2, seed = 1}
    fails("renormalize off", moe.save_pretrained, o, tmpdir(), {model_type = "mixtral"})
    fails("model_type is required", moe.save_pretrained, o, tmpdir())
    fails("unknown model_type 'llama'", moe.save_pretrained, o, tmpdir(), {model_type = "llama"})
  end)
end)

describe("Hugging Face checkpoint errors", function()
  it("names a missing tensor", function()
    local d = edited_copy("olmoe", function(l)
      local out = {}
      for _, e in ipairs(l) do if e[1] ~= "model.layers.1.self_attn.k_proj.weight" then out[#out + 1] = e end end
      return out
    end)
    fails("missing tensor model.layers.1.self_attn.k_proj.weight", moe.from_pretrained, d)
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("names a missing expert tensor with its HF name (Mixtral's w1..w3)", function()
    local d = edited_copy("mixtral", function(l)
      local out = {}
      for _, e in ipairs(l) do if e[1] ~= "model.layers.0.block_sparse_moe.experts.3.w2.weight" then out[#out + 1] = e end end
      return out
    end)
    fails("missing tensor model.layers.0.block_sparse_moe.experts.3.w2.weight", moe.from_pretrained, d)
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("reports a wrong shape, expected vs got", function()
    local d = edited_copy("olmoe", function(l)
      for _, e in ipairs(l) do
        if e[1] == "model.layers.0.self_attn.q_proj.weight" then e[2] = moe.zeros({32, 16}) end
      end
      return l
    end)
    fails("tensor model.layers.0.self_attn.q_proj.weight has shape [32, 16], expected [32, 32]", moe.from_pretrained, d)
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("reports tensors the architecture does not use", function()
    local d = edited_copy("olmoe", function(l)
      l[#l + 1] = {"model.layers.0.self_attn.o_proj.bias", moe.zeros({32})}
      return l
    end)
    fails("does not use: model.layers.0.self_attn.o_proj.bias", moe.from_pretrained, d)
    os.execute("rm -rf '" .. d .. "'")
  end)

  it("rejects an unknown or mismatched model_type", function()
    local d = edited_copy("olmoe", nil, function(c) c.model_type = "llama" end)
    fails("unknown model_type 'llama'", moe.from_pretrained, d)
    os.execute("rm -rf '" .. d .. "'")
    fails("holds a 'olmoe' checkpoint, not mixtral", moe.models.Mixtral.from_pretrained, FIX .. "olmoe")
    local d2 = edited_copy("olmoe", nil, function(c) c.rope_parameters.rope_type = "yarn" end)
    fails("rope_type 'yarn' is not supported", moe.from_pretrained, d2)
    os.execute("rm -rf '" .. d2 .. "'")
    fails("cannot read", moe.from_pretrained, "/nonexistent/dir")
  end)

  it("reports a truncated file", function()
    for _, keep in ipairs{3000, 160000} do
      local d = tmpdir()
      copy_file(FIX .. "olmoe/config.json", d .. "/config.json")
      local fh = assert(io.open(FIX .. "olmoe/model.safetensors", "rb"))
      local data = fh:read("*a")
      fh:close()
      fh = assert(io.open(d .. "/model.safetensors", "wb"))
      fh:write(data:sub(1, keep))
      fh:close()
      local msg = fails("from_pretrained: safetensors", moe.from_pretrained, d)
      assert.is_truthy(msg:find("truncated", 1, true) or msg:find("exceeds", 1, true) or msg:find("past", 1, true), msg)
      os.execute("rm -rf '" .. d .. "'")
    end
  end)

  it("reports a missing weights file", function()
    local d = tmpdir()
    copy_file(FIX .. "olmoe/config.json", d .. "/config.json")
    fails("has neither model.safetensors nor model.safetensors.index.json", moe.from_pretrained, d)
    os.execute("rm -rf '" .. d .. "'")
  end)
end)
