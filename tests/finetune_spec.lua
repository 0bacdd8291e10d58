-- Fine-tuning (moelab.finetune: moe.FineTuner, prompt/completion batches) and
-- sparse upcycling (moelab.upcycle): the loss is on completion tokens only,
-- truncation and packing, deterministic shuffling, JSONL errors with line
-- numbers, freezing, the loss going down, upcycled == dense, and the
-- recipes/finetune_olmoe.lua run end to end.
local moe = require "moelab"
local finetune = require "moelab.finetune"
local upcycle = require "moelab.upcycle"
local files = require "helpers.files"

local IGNORE = -100
local dir = files.tmpdir()
teardown(files.cleanup)

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local function errmsg(f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error, the call succeeded")
  return tostring(e)
end

local function small_model(extra)
  local o = {vocab_size = 128, hidden_size = 32, num_layers = 2, num_heads = 4, num_experts = 4,
             experts_per_token = 2, expert_intermediate_size = 32, seed = 3}
  for k, v in pairs(extra or {}) do o[k] = v end
  return moe.MoEModel(o)
end

local function pairs_data(n)
  local ex = {}
  for i = 1, n do ex[i] = {prompt = "Q" .. (i % 10) .. "=", completion = string.char(65 + i % 10) .. ";"} end
  return ex
end

local function snapshot(model, pattern)
  local t = {}
  for _, p in ipairs(model:parameters()) do
    if p.name:match(pattern) then t[p.name] = p.value:contiguous() * 1 end
  end
  return t
end

local function max_change(model, snap)
  local m = 0
  for _, p in ipairs(model:parameters()) do
    if snap[p.name] then m = math.max(m, (p.value - snap[p.name]):abs():max():item()) end
  end
  return m
end

describe("finetune: prompt/completion rows", function()
  it("puts targets on completion tokens only, -100 on the prompt and on padding", function()
    local src = finetune.dataset{examples = {{prompt = "ab", completion = "cd"}}, seq_len = 6}
    local ids, tg = src:row(1)
    -- tokens a b c d: inputs a b c d pad pad; targets: b (prompt) ignored, c, d, then padding
    assert.same({97, 98, 99, 100, 0, 0}, ids)
    assert.same({IGNORE, 99, 100, IGNORE, IGNORE, IGNORE}, tg)
    assert.equal(2, src.target_tokens)
  end)

  it("changing prompt-only tokens changes nothing in the targets", function()
    local a = finetune.dataset{examples = {{prompt = "hello world: ", completion = "yes"}}, seq_len = 20}
    local b = finetune.dataset{examples = {{prompt = "HELLO-there! ", completion = "yes"}}, seq_len = 20}
    local ia, ta = a:row(1)
    local ib, tb = b:row(1)
    assert.are_not.same(ia, ib)
    assert.same(ta, tb)
  end)

  it("the model's loss is the mean cross-entropy over completion tokens only", function()
    local model = small_model()
    local src = finetune.dataset{examples = {{prompt = "xyz=", completion = "abc"}, {prompt = "q", completion = "rs"}},
                                 seq_len = 8}
    local ids, targets = src:window_batch(8, 0, 2)
    local out = model:forward(ids, {targets = targets})
    local logits, tg = out.logits:to_table(), targets:to_table()
    local sum, n = 0, 0
    for b = 1, 2 do
      for t = 1, 8 do
        local y = tg[b][t]
        if y ~= IGNORE then
          local row, mx = logits[b][t], -math.huge
          for _, v in ipairs(row) do mx = math.max(mx, v) end
          local z = 0
          for _, v in ipairs(row) do z = z + math.exp(v - mx) end
          sum = sum + (mx + math.log(z) - row[y + 1])
          n = n + 1
        end
      end
    end
    assert.equal(3 + 2, n)
    assert.is_true(math.abs(out.loss:item() - sum / n) < 1e-5)
  end)

  it("adds EOS as a target when there is one", function()
    local src = finetune.dataset{examples = {{prompt = "a", completion = "b"}}, seq_len = 4, eos_id = 3}
    local ids, tg = src:row(1)
    assert.same({97, 98, 3, 0}, ids)
    assert.same({98, 3, IGNORE, IGNORE}, tg)
  end)

  it("truncates long examples from the left of the prompt and refuses completions that cannot fit", function()
    local src = finetune.dataset{examples = {{prompt = "0123456789", completion = "ab"}, {prompt = "x", completion = "y"}},
                                 seq_len = 5}
    assert.equal(1, src.truncated)
    local ids, tg = src:row(1)
    -- seq_len + 1 = 6 tokens kept: "6789" (the prompt's last four) .. "ab"
    assert.same({string.byte("6"), string.byte("7"), string.byte("8"), string.byte("9"), 97}, ids)
    assert.same({IGNORE, IGNORE, IGNORE, 97, 98}, tg)
    local e = errmsg(finetune.dataset, {examples = {{prompt = "p", completion = "ok"}, {prompt = "p", completion = "abcdef"}},
                                        seq_len = 5})
    assert.matches("example 2: the completion has 6 tokens, more than seq_len %(5%)", e)
    assert.matches("has no token to learn", errmsg(finetune.dataset, {examples = {{prompt = "p", completion = ""}}, seq_len = 5}))
  end)

  it("packs examples into rows that share one token, dropping rows without a completion token", function()
    local src = finetune.dataset{examples = {{prompt = "ab", completion = "c"}, {prompt = "de", completion = "f"}},
                                 seq_len = 3, packing = true}
    -- stream a b c d e f, targets c f: rows [a b c d] and [d e f]
    assert.equal(2, src:num_rows())
    local i1, t1 = src:row(1)
    local i2, t2 = src:row(2)
    assert.same({97, 98, 99}, i1)
    assert.same({IGNORE, 99, IGNORE}, t1)
    assert.same({100, 101, 102}, i2)
    assert.same({IGNORE, 102, IGNORE}, t2)
  end)

  it("splits long text examples into rows with every token a target", function()
    local src = finetune.dataset{examples = {{text = "abcdefg"}}, seq_len = 3}
    assert.equal(2, src:num_rows())   -- abcd, defg
    local ids, tg = src:row(1)
    assert.same({97, 98, 99}, ids)
    assert.same({98, 99, 100}, tg)
  end)

  it("shuffles deterministically from the seed, each epoch a permutation of the rows", function()
    local src = finetune.dataset{examples = pairs_data(10), seq_len = 8}
    local function order(seed, steps)
      local seen = {}
      for s = 0, steps - 1 do
        local ids = src:batch{batch_size = 5, seq_len = 8, seed = seed, step = s}
        for _, r in ipairs(ids:to_table()) do seen[#seen + 1] = table.concat(r, ",") end
      end
      return seen
    end
    assert.same(order(1, 2), order(1, 2))
    assert.are_not.same(order(1, 2), order(2, 2))
    local e0, all = order(1, 2), {}
    for i = 1, 10 do all[#all + 1] = table.concat((src:row(i)), ",") end
    table.sort(e0); table.sort(all)
    assert.same(all, e0)
    local keep = finetune.dataset{examples = pairs_data(4), seq_len = 8, shuffle = false}
    assert.same({keep:row(1)}, {keep:row(1)})
    assert.same(keep:batch{batch_size = 4, seq_len = 8, step = 0}:to_table()[3], (keep:row(3)))
  end)
end)

describe("finetune: datasets and errors", function()
  it("reads JSONL and names the file and line of malformed JSON and missing fields", function()
    local good = write(dir .. "/good.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"text": "xyz"}\n')
    local list = finetune.read_jsonl(good)
    assert.equal(2, #list)
    assert.equal(3, list[2].line)
    local bad = write(dir .. "/bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": "a",, }\n')
    assert.matches("bad%.jsonl:3: malformed JSON", errmsg(finetune.read_jsonl, bad))
    local missing = write(dir .. "/missing.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert.matches("missing%.jsonl:2: missing field 'completion'", errmsg(finetune.read_jsonl, missing))
    local typed = write(dir .. "/typed.jsonl", '{"prompt": 1, "completion": "b"}\n')
    assert.matches("typed%.jsonl:1: field 'prompt' must be a string", errmsg(finetune.read_jsonl, typed))
    local arr = write(dir .. "/arr.jsonl", '[1, 2]\n')
    assert.matches("arr%.jsonl:1: missing fields 'prompt' and 'completion'", errmsg(finetune.read_jsonl, arr))
    assert.matches("cannot open", errmsg(finetune.read_jsonl, dir .. "/nope.jsonl"))
    -- the same errors through FineTuner:train
    local ft = finetune.FineTuner{model = small_model(), progress = false}
    assert.matches("bad%.jsonl:3: malformed JSON", errmsg(ft.train, ft, {dataset = bad, max_steps = 1, seq_len = 8}))
  end)

  it("rejects malformed example lists, unknown options and ids beyond the vocabulary", function()
    local ft = finetune.FineTuner{model = small_model(), progress = false}
    assert.matches("dataset%[2%]: missing field 'prompt'",
      errmsg(ft.train, ft, {dataset = {{prompt = "a", completion = "b"}, {completion = "c"}}, max_steps = 1, seq_len = 8}))
    assert.matches("unknown option 'epochs'", errmsg(ft.train, ft, {dataset = pairs_data(2), epochs = 1}))
    assert.matches("task must be", errmsg(ft.train, ft, {dataset = pairs_data(2), max_steps = 1, task = "classify"}))
    assert.matches("give num_epochs or max_steps", errmsg(ft.train, ft, {dataset = pairs_data(2), seq_len = 8}))
    assert.matches("token id 200 but the model's vocab_size is 128",
      errmsg(ft.train, ft, {dataset = {{prompt = "a", completion = "\200"}}, max_steps = 1, seq_len = 8}))
    assert.matches("FineTuner: unknown option", errmsg(finetune.FineTuner, {model = small_model(), freeze = true}))
  end)

  it("trains on plain text files (byte-level: the memory-mapped moe.data dataset)", function()
    local txt = write(dir .. "/plain.txt", string.rep("the quick brown fox jumps over the lazy dog. ", 40))
    local ft = finetune.FineTuner{model = small_model({vocab_size = 256}), progress = false}
    local r = ft:train{dataset = txt, max_steps = 3, batch_size = 2, seq_len = 16, learning_rate = 1e-3}
    assert.equal(3, r.steps)
    assert.is_nil(r.data)
    assert.is_true(ft:evaluate(txt).loss > 0)
  end)

  it("uses a moe.tokenizer, with its <|endoftext|> as EOS", function()
    local ok, tokmod = pcall(require, "moelab.tokenizer")
    if not ok or not pcall(function() return tokmod.from_file end) then pending("no moe.tokenizer in this build"); return end
    local vocab = {["<unk>"] = 0, ab = 7}
    for i, c in ipairs{"a", "b", "c", "=", " "} do vocab[c] = i end
    local path = write(dir .. "/tok.json", moe.io.json.encode{version = "1.0",
      model = {type = "BPE", vocab = vocab, merges = {"a b"}, unk_token = "<unk>"},
      added_tokens = {{id = 6, content = "<|endoftext|>", special = true, normalized = false, lstrip = false,
                       rstrip = false, single_word = false}}})
    local tok = tokmod.from_file(path)
    local src = finetune.dataset{examples = {{prompt = "ab=", completion = "c"}}, seq_len = 6, tokenizer = tok}
    assert.equal(6, src.eos_id)
    local ids, tg = src:row(1)
    assert.same({7, 4, 3, 6, 0, 0}, ids)   -- "ab" merged, "=", "c", <|endoftext|>
    assert.same({IGNORE, 3, 6, IGNORE, IGNORE, IGNORE}, tg)
    local ft = finetune.FineTuner{model = small_model({vocab_size = 8}), progress = false}
    local r = ft:train{dataset = {{prompt = "ab=", completion = "c"}, {prompt = "ba=", completion = "a"}}, max_steps = 2,
                       batch_size = 2, seq_len = 6, tokenizer = tok}
    assert.equal(4, r.data.target_tokens)
  end)
end)

describe("FineTuner: training", function()
  it("lowers the completion loss on a tiny dataset and reports it per step", function()
    local model = small_model()
    local run = dir .. "/run_loss"
    local ft = finetune.FineTuner{model = model, run_dir = run, progress = false}
    local data = pairs_data(20)
    local before = ft:evaluate(data, {seq_len = 8})
    local r = ft:train{dataset = data, num_epochs = 10, batch_size = 4, seq_len = 8, learning_rate = 3e-3, seed = 1}
    assert.equal(50, r.steps)
    assert.equal(20, r.data.rows)
    assert.equal(40, r.data.target_tokens)
    local after = ft:evaluate(data)
    assert.equal(40, after.tokens)
    assert.is_true(after.loss < before.loss * 0.5, string.format("%g -> %g", before.loss, after.loss))
    assert.is_true(r.final_loss < r.history[1].loss)
    assert.is_true(files.exists(run .. "/metrics.jsonl"))
    assert.is_true(files.exists(run .. "/checkpoint/trainer_state.json"))
  end)

  it("freeze_router leaves the router unchanged; freeze_experts leaves the experts unchanged", function()
    local model = small_model()
    local router, experts, rest = snapshot(model, "%.mlp%.gate%."), snapshot(model, "%.mlp%.experts%."),
                                  snapshot(model, "self_attn")
    local ft = finetune.FineTuner{model = model, freeze_router = true, progress = false}
    ft:train{dataset = pairs_data(8), max_steps = 4, batch_size = 4, seq_len = 8, learning_rate = 1e-2}
    assert.equal(0, max_change(model, router))
    assert.is_true(max_change(model, experts) > 0)
    assert.is_true(max_change(model, rest) > 0)

    local m2 = small_model()
    router, experts = snapshot(m2, "%.mlp%.gate%."), snapshot(m2, "%.mlp%.experts%.")
    local ft2 = finetune.FineTuner{model = m2, freeze_experts = true, router_learning_rate = 1e-2, progress = false}
    ft2:train{dataset = pairs_data(8), max_steps = 4, batch_size = 4, seq_len = 8, learning_rate = 1e-2}
    assert.equal(0, max_change(m2, experts))
    assert.is_true(max_change(m2, router) > 0)
  end)

  it("resumes bit for bit from its checkpoint", function()
    local data = pairs_data(12)
    local a = finetune.FineTuner{model = small_model(), progress = false}
    -- a constant schedule (cosine depends on max_steps), so the 3-step run is the 6-step run's start
    local ra = a:train{dataset = data, max_steps = 6, batch_size = 4, seq_len = 8, learning_rate = 1e-3, seed = 2,
                       lr_schedule = "constant"}
    local run = dir .. "/run_resume"
    local b = finetune.FineTuner{model = small_model(), run_dir = run, progress = false}
    b:train{dataset = data, max_steps = 3, batch_size = 4, seq_len = 8, learning_rate = 1e-3, seed = 2,
            lr_schedule = "constant"}
    local c = finetune.FineTuner{model = small_model(), run_dir = run, progress = false}
    local rc = c:train{dataset = data, max_steps = 6, batch_size = 4, seq_len = 8, learning_rate = 1e-3, seed = 2,
                       lr_schedule = "constant", resume = true}
    for step = 4, 6 do assert.equal(ra.history[step].loss, rc.history[step].loss) end
    local pa, pc = a.model:parameters(), c.model:parameters()
    for i = 1, #pa do assert.is_true(pa[i].value:equal(pc[i].value), pa[i].name) end
  end)
end)

describe("upcycle", function()
  local dense = moe.MoEModel{vocab_size = 64, hidden_size = 32, num_layers = 3, num_heads = 4, num_kv_heads = 2,
                             moe_layer_frequency = 0, intermediate_size = 48, seed = 5}
  local ids = moe.tensor({{1, 5, 9, 13, 17, 21, 25, 29}, {2, 4, 8, 16, 32, 63, 0, 7}}, {dtype = "i64"})

  it("copies the dense FFN into every expert; a zero router with renormalize gives the dense logits", function()
    local moe_model = upcycle.upcycle{dense = dense, num_experts = 4, experts_per_token = 2, renormalize = true, router_init_std = 0}
    assert.equal(3, #moe_model:moe_layers())
    local src = {}
    for _, p in ipairs(dense:parameters()) do src[p.name] = p.value end
    for _, p in ipairs(moe_model:parameters()) do
      local part = p.name:match("^layers%.%d+%.mlp%.experts%.([%w_]+)$")
      if part then
        local from = src[(p.name:gsub("experts%.([%w_]+)$", "%1.weight"))]
        for e = 1, 4 do assert.equal(0, (p.value:select(1, e) - from):abs():max():item()) end
      elseif p.name:match("%.mlp%.gate%.") then
        assert.equal(0, p.value:abs():max():item())
      else
        assert.equal(0, (p.value - src[p.name]):abs():max():item(), p.name)
      end
    end
    local a = dense:forward(ids).logits
    local b = moe_model:forward(ids).logits
    assert.is_true((a - b):abs():max():item() <= 1e-5)
  end)

  it("a random router still gives the dense function (identical experts), renormalize = false does not", function()
    local r = upcycle.upcycle{dense = dense, num_experts = 8, experts_per_token = 2, seed = 1}
    local g = r:parameters()
    local gate
    for _, p in ipairs(g) do if p.name == "layers.0.mlp.gate.weight" then gate = p.value end end
    assert.is_true(gate:abs():max():item() > 0)
    local a = dense:forward(ids).logits
    assert.is_true((a - r:forward(ids).logits):abs():max():item() <= 1e-5)
    local nr = upcycle.upcycle{dense = dense, num_experts = 4, experts_per_token = 2, renormalize = false, router_init_std = 0}
    assert.is_true((a - nr:forward(ids).logits):abs():max():item() > 1e-3)
  end)

  it("keeps layers dense by moe_layer_frequency and perturbs copies with expert_noise_std", function()
    local m = upcycle.upcycle{dense = dense, num_experts = 4, moe_layer_frequency = 2}
    assert.equal(1, #m:moe_layers())
    assert.is_true((dense:forward(ids).logits - m:forward(ids).logits):abs():max():item() <= 1e-5)
    local noisy = upcycle.upcycle{dense = dense, num_experts = 2, experts_per_token = 1, expert_noise_std = 0.01}
    local bank
    for _, p in ipairs(noisy:parameters()) do if p.name == "layers.1.mlp.experts.up_proj" then bank = p.value end end
    assert.is_true((bank:select(1, 1) - bank:select(1, 2)):abs():max():item() > 0)
  end)

  it("loads a dense Llama-style checkpoint directory", function()
    local d = dir .. "/llama"
    moe.io.mkdir_p(d)
    local list = {}
    for _, p in ipairs(dense:parameters()) do
      list[#list + 1] = {p.name == "lm_head.weight" and p.name or "model." .. p.name, p.value}
    end
    moe.io.safetensors.save(d .. "/model.safetensors", list, {format = "pt"})
    write(d .. "/config.json", moe.io.json.encode{model_type = "llama", vocab_size = 64, hidden_size = 32,
      num_hidden_layers = 3, num_attention_heads = 4, num_key_value_heads = 2, intermediate_size = 48,
      rms_norm_eps = dense.config.norm_eps, rope_theta = 10000, hidden_act = "silu", tie_word_embeddings = false})
    local m = upcycle.upcycle{dense = d, num_experts = 4, experts_per_token = 2}
    assert.equal("mixtral", m.hf.model_type)
    assert.is_true((dense:forward(ids).logits - m:forward(ids).logits):abs():max():item() <= 1e-5)
    write(d .. "/config.json", moe.io.json.encode{model_type = "gpt2"})
    assert.matches("model_type 'gpt2' is not a supported dense model", errmsg(upcycle.upcycle, {dense = d, num_experts = 2}))
  end)

  it("refuses MoE models and bad options", function()
    assert.matches("dense has 2 MoE layer", errmsg(upcycle.upcycle, {dense = small_model(), num_experts = 4}))
    assert.matches("num_experts must be", errmsg(upcycle.upcycle, {dense = dense}))
    assert.matches("unknown option 'experts'", errmsg(upcycle.upcycle, {dense = dense, experts = 4}))
    assert.matches("experts_per_token %(3%) exceeds", errmsg(upcycle.upcycle, {dense = dense, num_experts = 2,
                                                                               experts_per_token = 3}))
  end)

  it("an upcycled model fine-tunes", function()
    local m = upcycle.upcycle{dense = moe.MoEModel{vocab_size = 128, hidden_size = 32, num_layers = 2, num_heads = 4,
                                                   moe_layer_frequency = 0, intermediate_size = 32, seed = 1},
                              num_experts = 4, experts_per_token = 2, expert_noise_std = 1e-3}
    local ft = finetune.FineTuner{model = m, progress = false}
    local r = ft:train{dataset = pairs_data(8), max_steps = 5, batch_size = 4, seq_len = 8, learning_rate = 3e-3}
    assert.is_true(r.final_loss < r.history[1].loss)
  end)
end)

describe("recipes/finetune_olmoe.lua", function()
  it("fine-tunes the tiny OLMoE with the router frozen, saves, reloads with equal logits", function()
    local out = dir .. "/recipe"
    local bin = os.getenv("MOELAB_BIN") or "./moelab"
    local text, rc = files.sh(bin .. " recipes/finetune_olmoe.lua tests/fixtures/hf/olmoe 4 " .. out)
    assert.equal(0, rc, text)
    assert.matches("router weights: max change 0 %(frozen%)", text)
    assert.matches("reloaded logits: max |diff| 0 ", text)
    assert.is_true(files.exists(out .. "/hf/model.safetensors"))
    assert.is_true(files.exists(out .. "/hf/config.json"))
    assert.is_true(files.exists(out .. "/train/metrics.jsonl"))
  end)
end)
