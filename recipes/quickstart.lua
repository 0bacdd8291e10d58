-- Quickstart: train a small byte-level transformer language model on the
-- built-in primer text (data/primer.txt), with a progress line, then sample.
--   ./moelab recipes/quickstart.lua [steps]
-- (The MoE blocks arrive with the training issue; this recipe already runs
-- the engine end to end: embeddings, attention, SwiGLU, the tape, AdamW.)
local moe = require "moelab"

local steps = tonumber(arg and arg[1]) or 400
local seq_len, batch, hidden, layers = 32, 8, 64, 2

-- locate the corpus next to this recipe
local here = (arg and arg[0] or "recipes/quickstart.lua"):match("^(.*)/[^/]*$") or "."
local f = assert(io.open(here .. "/../data/primer.txt", "rb"), "cannot open data/primer.txt")
local text = f:read("*a")
f:close()
local bytes = {text:byte(1, -1)}
print(string.format("corpus: %d bytes; model: %d layers, hidden %d; %d steps of %dx%d tokens",
  #bytes, layers, hidden, steps, batch, seq_len))

local seed = 0
local function layer_seed() seed = seed + 1; return seed end
local emb = moe.nn.Embedding(256, hidden, {seed = layer_seed()})
local blocks = {}
for i = 1, layers do
  blocks[i] = {
    norm1 = moe.nn.RMSNorm(hidden),
    attn = moe.nn.Attention{hidden_size = hidden, num_heads = 4, num_kv_heads = 2, seed = layer_seed()},
    norm2 = moe.nn.RMSNorm(hidden),
    ffn = moe.nn.FeedForward{hidden_size = hidden, intermediate_size = 4 * hidden, seed = layer_seed()},
  }
end
local final_norm = moe.nn.RMSNorm(hidden)
local head = moe.nn.Linear(hidden, 256, {bias = false, seed = layer_seed()})

local all = {emb = emb, final_norm = final_norm, head = head}
for i, b in ipairs(blocks) do
  all["block" .. i] = moe.nn.ModuleList{norm1 = b.norm1, attn = b.attn, norm2 = b.norm2, ffn = b.ffn}
end
local model = moe.nn.ModuleList(all)
print(string.format("parameters: %d", model:num_params()))

local function forward(ids, tape)
  local x = emb:forward(ids, tape)
  for _, b in ipairs(blocks) do
    x = tape:add(x, b.attn:forward(b.norm1:forward(x, tape), tape))
    x = tape:add(x, b.ffn:forward(b.norm2:forward(x, tape), tape))
  end
  return head:forward(final_norm:forward(x, tape), tape)
end

-- deterministic batches from the data stream of the RNG
local sampler = moe.rand({steps * batch}, {seed = 1234})
local function get_batch(step)
  local ids, targets = {}, {}
  for b = 1, batch do
    local u = sampler:get_flat((step - 1) * batch + b)
    local start = 1 + math.floor(u * (#bytes - seq_len - 1))
    local row, trow = {}, {}
    for t = 1, seq_len do
      row[t] = bytes[start + t - 1]
      trow[t] = bytes[start + t]
    end
    ids[b], targets[b] = row, trow
  end
  return moe.tensor(ids, {dtype = "i64"}), moe.tensor(targets, {dtype = "i64"})
end

local opt = moe.optim.AdamW{params = model, lr = 3e-3, weight_decay = 0.01}
local t0 = moe.clock()
local first_loss, loss_value
for step = 1, steps do
  local ids, targets = get_batch(step)
  local tape = moe.Tape()
  local loss = tape:cross_entropy(forward(ids, tape), targets)
  opt:zero_grad()
  tape:backward(loss)
  opt:step()
  loss_value = loss:item()
  first_loss = first_loss or loss_value
  if step % 10 == 0 or step == steps then
    local elapsed = moe.clock() - t0
    io.write(string.format("\rstep %4d/%d  loss %.4f  %.0f tok/s", step, steps, loss_value,
      step * batch * seq_len / math.max(elapsed, 1e-9)))
    io.flush()
  end
end
io.write("\n")
print(string.format("loss %.4f -> %.4f", first_loss, loss_value))

-- greedy sampling from a prompt
local prompt = "The router "
local ids = {prompt:byte(1, -1)}
for _ = 1, 60 do
  local ctx = {}
  for i = math.max(1, #ids - seq_len + 1), #ids do ctx[#ctx + 1] = ids[i] end
  local logits = forward(moe.tensor({ctx}, {dtype = "i64"}), moe.Tape())
  local last = logits:select(2, #ctx)
  local _, idx = last:topk(1)
  ids[#ids + 1] = idx:get_flat(1)
end
print("sample: " .. string.char(unpack(ids)):gsub("\n", " "))
