-- Expert parallelism: an OLMoE-style model whose experts are split over the
-- ranks (each rank holds and trains only its share), trained on the built-in
-- corpus. Every rank runs this same script:
--   ./moelab --nproc 2 recipes/expert_parallel.lua [max_steps] [dispatch]
--   mpirun -np 2 ./moelab recipes/expert_parallel.lua      (or across hosts with a hostfile)
-- On CPUs the exchanges run over MPI. With a CUDA build and a GPU per rank the
-- model moves to cuda and they run over NCCL (this recipe itself has run on
-- CPUs only; tools/gpu_dist_bench.sh is the GPU run that is measured).
-- dispatch: "auto" (all_gather at two expert-parallel ranks, all-to-all
-- beyond), "alltoall" or "allgather".
local moe = require "moelab"
local steps = tonumber(arg and arg[1]) or 60
local dispatch = arg and arg[2] or "auto"

local dist = moe.dist
local info = dist.init()
local world, rank = dist.world_size(), dist.rank()
local train, eval = moe.data.corpus{seed = 4, num_bytes = 400000}:split(0.05)
local model = moe.arch.OLMoE{
  vocab_size = 256, hidden_size = 64, num_layers = 2, num_heads = 4,
  num_experts = 8, experts_per_token = 2, expert_intermediate_size = 64, seed = 1,
}
if moe.cuda_available and moe.cuda_available() then model:to("cuda") end
local ep = world % 2 == 0 and 2 or 1   -- expert-parallel groups of two ranks; data parallel across the groups
local trainer = moe.distributed.DistributedMoETrainer{
  model = model, expert_parallel_size = ep, expert_parallel_dispatch = dispatch,
  aux_loss_coef = 0.01, progress = rank == 0,
}
if rank == 0 then
  local c = trainer:parameter_counts()
  print(string.format("%d rank(s) (%s): expert_parallel_size %d x data_parallel_size %d, dispatch %s; "
    .. "%d of %d parameters on each rank", world, info.backend or "?", trainer.expert_parallel_size,
    trainer.data_parallel_size, tostring(trainer.expert_parallel_dispatch or "none"), c.per_rank, c.total))
end
local r = trainer:train{train_data = train, batch_size = 8, seq_len = 64, learning_rate = 3e-3,
                        warmup_steps = 10, max_steps = steps}
local ev = trainer:evaluate(eval, {batches = 4})
if rank == 0 then
  print(string.format("loss %.3f -> %.3f over %d steps of %d tokens; held-out perplexity %.2f",
    r.history[1].loss, r.history[#r.history].loss, #r.history, r.global_batch_size * 64, ev.perplexity))
end
