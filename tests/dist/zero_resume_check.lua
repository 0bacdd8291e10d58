-- Run by tests/dist_spec.lua under `mpirun -np 2 ./moelab tests/dist/zero_resume_check.lua`.
-- The checkpoints ZeRO-1 and ZeRO-2 write hold the true AdamW state whatever
-- happens before the save: a resume with nothing left to train (the closing
-- save and save_checkpoint right after the resume), and a last step skipped
-- for a non-finite gradient norm (the state is that of the step before). And
-- train{save_final = false} makes no gather of m and v at all. Prints
-- "ZERO_RESUME_OK <rank>".
local d = moe.dist
d.init{timeout = 30}
local rank, world = d.rank(), d.world_size()
assert(world == 2, "run with 2 ranks")

local corpus = moe.data.corpus{seed = 7, num_bytes = 40000}
local function model(seed)
  -- odd sizes so the flat buffer is not a multiple of the world size (padding)
  return moe.MoEModel{vocab_size = 257, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 4,
                      experts_per_token = 2, expert_intermediate_size = 16, seed = seed}
end
local function batch(g) return corpus:batch{batch_size = 2, seq_len = 8, seed = 3, step = g} end
local steps = 3
local function train_opts(extra)
  local o = {max_steps = steps, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1,
             lr_schedule = "constant", batch_fn = batch}
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end
local function trainer(zs, run_dir, extra)
  local o = {model = model(rank == 0 and 11 or 99), zero_stage = zs, run_dir = run_dir, progress = false,
             aux_loss_coef = 0.01, grad_clip = 0.05}
  for k, v in pairs(extra or {}) do o[k] = v end
  return moe.distributed.DistributedMoETrainer(o)
end

-- run directories both ranks name (rank 0 writes them)
local dir_t = moe.tensor({os.time() % 100000, math.random(1, 99999)}, {dtype = "f64"})
d.broadcast(dir_t, 0)
local dv = dir_t:to_table()
local root = string.format("/tmp/moelab_zero_resume_%d_%d", dv[1], dv[2])
local function run_dir(what) return root .. "/" .. what end

-- a checkpoint's optimizer state and step (rank 0 reads; the values copied out of the file)
local function saved(dir)
  local ck = moe.io.safetensors.load(dir .. "/optimizer.safetensors")
  local state = moe.io.json.decode(moe.io.read_file(dir .. "/trainer_state.json"))
  return {m = ck.exp_avg:to_table(), v = ck.exp_avg_sq:to_table(), step = state.step,
          optimizer_step = state.optimizer_step}
end
local function nonzero(t)
  for _, x in ipairs(t) do if x ~= 0 then return true end end
  return false
end
-- the same values: bit for bit where the state was copied (tol nil), else to a relative tol
local function same(got, want, what, tol)
  assert(got.step == want.step, what .. ": step " .. tostring(got.step) .. " vs " .. tostring(want.step))
  assert(got.optimizer_step == want.optimizer_step, what .. ": optimizer step " .. tostring(got.optimizer_step)
    .. " vs " .. tostring(want.optimizer_step))
  for _, k in ipairs{"m", "v"} do
    assert(#got[k] == #want[k], what .. ": " .. k .. " sizes differ")
    assert(nonzero(got[k]), what .. ": " .. k .. " is all zeros")
    for i = 1, #want[k] do
      local a, b = got[k][i], want[k][i]
      if a ~= b and not (tol and math.abs(a - b) <= tol * math.max(math.abs(a), math.abs(b))) then
        error(string.format("rank %d: %s: %s[%d] = %.9g, want %.9g", rank, what, k, i, a, b), 2)
      end
    end
  end
end

for _, zs in ipairs{1, 2} do
  local name = "ZeRO-" .. zs
  -- (1) train, save (the closing checkpoint), then resume with nothing left to train
  local a = run_dir("z" .. zs)
  trainer(zs, a):train(train_opts())
  d.barrier()
  local want = rank == 0 and saved(a .. "/checkpoint")
  local tr = trainer(zs, a)
  local res = tr:train(train_opts{resume = a .. "/checkpoint"})
  assert(res.steps == steps, name .. ": the resumed run trained")
  d.barrier()
  if rank == 0 then same(saved(a .. "/checkpoint"), want, name .. " closing checkpoint after a resume with nothing to train") end
  -- save_checkpoint (every rank) from the resumed trainer, still without a step
  tr:save_checkpoint(run_dir("z" .. zs .. "_again"))
  d.barrier()
  if rank == 0 then same(saved(run_dir("z" .. zs .. "_again")), want, name .. " save_checkpoint after a resume") end

  -- (2) a last step skipped (non-finite gradient norm on every rank): the
  -- closing checkpoint holds the state of the steps taken, as one that stops there
  local short = run_dir("z" .. zs .. "_short")
  trainer(zs, short):train(train_opts{max_steps = steps - 1})
  local skip = run_dir("z" .. zs .. "_skip")
  local poison = trainer(zs, skip, {grad_hook = function(t)
    if t.step == steps - 1 then
      local _, g = t.model.net:flat_parameters()
      g:fill(0 / 0)
    end
  end})
  local pres = poison:train(train_opts())
  assert(pres.skipped_steps == 1 and pres.history[steps].skipped, name .. ": the last step was not skipped")
  d.barrier()
  if rank == 0 then
    local got, ref = saved(skip .. "/checkpoint"), saved(short .. "/checkpoint")
    assert(got.step == steps, name .. ": skipped run saved step " .. tostring(got.step))
    got.step = ref.step   -- the trainer's step counts the skipped one; the optimizer's does not
    same(got, ref, name .. " closing checkpoint after a skipped last step", 1e-6)
  end

  -- (3) save_final = false: the parameters' gather after each step, and no gather of m and v
  local gathers = 0
  local all_gather = d.all_gather
  d.all_gather = function(...) gathers = gathers + 1; return all_gather(...) end
  local ok, err = pcall(function() trainer(zs, run_dir("z" .. zs .. "_nofinal")):train(train_opts{save_final = false}) end)
  d.all_gather = all_gather
  assert(ok, err)
  assert(gathers == steps, string.format("%s with save_final = false: %d all_gathers for %d steps", name, gathers, steps))
  d.barrier()
  if rank == 0 then
    local f = io.open(run_dir("z" .. zs .. "_nofinal") .. "/checkpoint/trainer_state.json")
    assert(not f, name .. ": save_final = false wrote a checkpoint")
  end
end
d.barrier()
if rank == 0 then os.execute("rm -rf '" .. root .. "'") end
print("ZERO_RESUME_OK " .. rank)
