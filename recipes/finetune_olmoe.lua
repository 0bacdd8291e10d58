-- Fine-tune an OLMoE checkpoint on prompt/completion pairs with the router
-- frozen, evaluate, save it for transformers and check the saved copy.
--   ./moelab recipes/finetune_olmoe.lua [CHECKPOINT_DIR] [max_steps] [OUT_DIR]
-- CHECKPOINT_DIR defaults to the tiny OLMoE in tests/fixtures/hf/olmoe (random
-- weights, vocabulary 128: byte-level ids); a downloaded allenai/OLMoE-1B-7B
-- directory works as is (its tokenizer.json is used; ~7B parameters in f32 need
-- ~28 GB for the weights and ~4x that to train with AdamW, plus the same again on
-- disk for runs/finetune_olmoe/train/checkpoint).
-- Outputs under OUT_DIR (default runs/finetune_olmoe): data/*.jsonl, train/metrics.jsonl,
-- train/checkpoint/ (weights + AdamW state) and hf/ (what transformers loads).
local moe = require "moelab"
local finetune = require "moelab.finetune"   -- moe.FineTuner is finetune.FineTuner
local mio = moe.io

local dir = arg and arg[1] or "tests/fixtures/hf/olmoe"
local steps = tonumber(arg and arg[2]) or 40
local out = arg and arg[3] or "runs/finetune_olmoe"

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- 1. the checkpoint
print("loading " .. dir)
local model = moe.models.OLMoE.from_pretrained(dir)
model:to(moe.default_device())
local big = model:num_params() > 1e8
print(string.format("OLMoE: %d layers, %d experts (top-%d), vocab %d; %.2fM parameters, %.2fM active, on %s",
  model.config.num_layers, model.config.num_experts, model.config.experts_per_token, model.config.vocab_size,
  model:num_params() / 1e6, model:num_active_params() / 1e6, model:device()))

-- 2. the tokenizer: the checkpoint's tokenizer.json when there is one, else bytes
local tokenizer, eos_id = nil, false
local ok_tok, tokmod = pcall(require, "moelab.tokenizer")
if exists(dir .. "/tokenizer.json") and ok_tok then
  tokenizer = tokmod.from_file(dir .. "/tokenizer.json")
  eos_id = model.hf.config.eos_token_id
  if type(eos_id) ~= "number" then eos_id = nil end   -- nil: FineTuner looks up <|endoftext|> and the like
  print(string.format("tokenizer: %s/tokenizer.json (vocab %d), EOS id %s", dir, tokenizer:vocab_size(), tostring(eos_id)))
else
  print("tokenizer: byte-level (no tokenizer.json" .. (ok_tok and "" or ", no moe.tokenizer in this build") .. "), no EOS")
end

-- 3. a small instruction set, written as JSONL (ASCII: byte ids < 128 fit the tiny vocabulary)
mio.mkdir_p(out .. "/data")
local words = {"cat", "dog", "moe", "lab", "sun", "sky", "red", "map", "top", "key", "box", "fig"}
local function example(i)
  local w = words[(i - 1) % #words + 1] .. words[(i * 5) % #words + 1]
  if i % 2 == 0 then return {prompt = "Reverse: " .. w .. "\nAnswer:", completion = " " .. w:reverse() .. "\n"} end
  return {prompt = "Upper: " .. w .. "\nAnswer:", completion = " " .. w:upper() .. "\n"}
end
local function write_jsonl(path, first, last)
  local lines = {}
  for i = first, last do lines[#lines + 1] = mio.json.encode(example(i)) end
  mio.write_file_atomic(path, table.concat(lines, "\n") .. "\n")
  return path
end
local train_path = write_jsonl(out .. "/data/train.jsonl", 1, 96)
local eval_path = write_jsonl(out .. "/data/eval.jsonl", 97, 120)
print(string.format("data: %s (96 examples), %s (24 examples)", train_path, eval_path))

-- 4. fine-tune: router frozen, experts and the rest trained
local ft = finetune.FineTuner{model = model, freeze_router = true, run_dir = out .. "/train", log_every = 10}
local opts = {seq_len = 48, batch_size = 8, tokenizer = tokenizer, eos_id = eos_id}
local router_before = {}
for _, p in ipairs(model:parameters()) do
  if p.name:match("%.mlp%.gate%.weight$") then router_before[p.name] = p.value:to("cpu"):contiguous() end
end
local before = ft:evaluate(eval_path, opts)
print(string.format("before: held-out completion loss %.4f (perplexity %.2f, %d tokens)", before.loss, before.perplexity, before.tokens))
local lr = big and 1e-5 or 3e-3
print(string.format("fine-tuning %d steps, learning rate %.0e, router frozen", steps, lr))
local r = ft:train{dataset = train_path, task = "text_generation", max_steps = steps, batch_size = 8, seq_len = 48,
                   learning_rate = lr, warmup_steps = math.min(5, steps - 1), tokenizer = tokenizer, eos_id = eos_id,
                   seed = 1}
local after = ft:evaluate(eval_path, opts)
print(string.format("after:  held-out completion loss %.4f (perplexity %.2f); training loss %.4f -> %.4f",
  after.loss, after.perplexity, r.history[1].loss, r.final_loss))
local moved = 0
for _, p in ipairs(model:parameters()) do
  local b = router_before[p.name]
  if b then moved = math.max(moved, (p.value:to("cpu"):contiguous() - b):abs():max():item()) end
end
print(string.format("router weights: max change %g (frozen)", moved))
assert(moved == 0, "the frozen router moved")
local ex = example(97)
local text = ft:generate(ex.prompt, {max_new_tokens = 8, tokenizer = tokenizer, eos_id = eos_id})
print(string.format("sample: %q -> %q (expected %q)", ex.prompt, text, ex.completion))

-- 5. save for transformers, reload, compare logits
local hf_dir = out .. "/hf"
moe.save_pretrained(model, hf_dir)
if exists(dir .. "/tokenizer.json") then
  mio.write_file_atomic(hf_dir .. "/tokenizer.json", mio.read_file(dir .. "/tokenizer.json"))
end
print("saved " .. hf_dir .. " (config.json, model.safetensors" .. (exists(hf_dir .. "/tokenizer.json") and ", tokenizer.json" or "") .. ")")
local reloaded = moe.models.OLMoE.from_pretrained(hf_dir)
reloaded:to(model:device())
local src = finetune.dataset{path = eval_path, seq_len = 48, tokenizer = tokenizer, eos_id = eos_id}
local ids = src:window_batch(48, 0, 4)
model:eval()
local a = model:forward(ids).logits:to("cpu")
local b = reloaded:forward(ids).logits:to("cpu")
local diff = (a - b):abs():max():item()
print(string.format("reloaded logits: max |diff| %g over %s", diff, table.concat(a:shape(), "x")))
assert(diff <= 1e-5, "the reloaded model's logits differ")
print("done: " .. out)
