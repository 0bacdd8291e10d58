#!/usr/bin/env bash
# Issue 7 (failure behaviour over NCCL): two ranks with the file rendezvous.
# (1) rank 1 exits right after a first all_reduce; rank 0's next all_reduce
# must fail naming rank 1 (heartbeats, MOELAB_DIST_HEARTBEAT_S, default 15 s)
# long before the 120 s collective timeout. (2) expert-parallel training
# (EP=2, token exchanges queued on the GPU without host waits); rank 1 is
# killed (SIGKILL) at a random point of its steps; rank 0 must stop with an
# error naming rank 1 within about the heartbeat limit, whether it was
# blocked in a collective or on the GPU behind a queued exchange (then the
# watcher thread aborts NCCL). Run on a 2-GPU machine with build/cuda/moelab
# carried.   tools/gpu_rank_death.sh [all_reduce|both] (all_reduce: only (1))
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
out=${OUT:-/tmp}
rdv=$(mktemp -d /tmp/moelab_rdv.XXXXXX)
script='
local moe = require "moelab"
local d = moe.dist
d.init{backend = "nccl", timeout = 120}
local x = moe.ones({1024}):to("cuda")
d.all_reduce(x, "sum")
if d.rank() == 1 then print("rank 1: leaving"); os.exit(3) end
local t0 = moe.clock()
local ok, err = pcall(d.all_reduce, x, "sum")
print(string.format("rank 0: all_reduce ok=%s after %.1f s: %s", tostring(ok), moe.clock() - t0, tostring(err)))
os.exit(ok and 1 or 0)'
pids=()
for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=$r MOELAB_DIST_RENDEZVOUS=$rdv \
        timeout 150 build/cuda/moelab -e "$script" >"$out/death_rank$r.log" 2>&1 &
    pids+=($!)
done
wait "${pids[0]}"; rc0=$?
wait "${pids[1]}"
rm -rf "$rdv"
cat "$out/death_rank1.log" "$out/death_rank0.log" | grep -v "NCCL INFO"
echo "rank 0 exit status $rc0 (0: it failed as it should, naming the rank)"
[ "${1:-both}" = all_reduce ] && exit $rc0
rc_ar=$rc0

ep_script='
local moe = require "moelab"
local d = moe.dist
d.init{backend = "nccl", timeout = 120}
local m = moe.arch.Mixtral{vocab_size = 256, hidden_size = 256, num_layers = 4, num_heads = 4, num_kv_heads = 2,
                           num_experts = 8, experts_per_token = 2, expert_intermediate_size = 512, seed = 1}
m:to("cuda")
local corpus = moe.data.corpus{seed = 1, num_bytes = 2000000}
local dt = moe.distributed.DistributedMoETrainer{model = m, progress = false, expert_parallel_size = 2}
print("ready"); io.stdout:flush()
local t0 = moe.clock()
local ok, err = pcall(dt.train, dt, {train_data = corpus, batch_size = 16, seq_len = 128, max_steps = 100000000,
                                     learning_rate = 1e-3})
print(string.format("rank %d: train ok=%s after %.1f s of training: %s", d.rank(), tostring(ok), moe.clock() - t0,
                    tostring(err)))
os.exit(ok and 1 or 0)'
rdv=$(mktemp -d /tmp/moelab_rdv.XXXXXX)
RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=0 MOELAB_DIST_RENDEZVOUS=$rdv \
    timeout 150 build/cuda/moelab -e "$ep_script" >"$out/death_ep_rank0.log" 2>&1 &
p0=$!
RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=1 MOELAB_DIST_RENDEZVOUS=$rdv \
    build/cuda/moelab -e "$ep_script" >"$out/death_ep_rank1.log" 2>&1 &
p1=$!
for _ in $(seq 1 120); do grep -q ready "$out/death_ep_rank1.log" 2>/dev/null && break; sleep 0.5; done
sleep "$(awk 'BEGIN { srand(); printf "%.2f", 4 + 4 * rand() }')"   # somewhere inside the steps
kill -9 "$p1"; t_kill=$(date +%s.%N)
wait "$p0"; rc_ep=$?
t_end=$(date +%s.%N)
wait "$p1" 2>/dev/null
rm -rf "$rdv"
grep -v "NCCL INFO" "$out/death_ep_rank0.log" | tail -3
echo "ep: rank 0 exit status $rc_ep $(awk -v a="$t_kill" -v b="$t_end" 'BEGIN { printf "%.1f s after rank 1 was killed", b - a }') (0: it failed as it should, naming the rank)"
[ "$rc_ep" -eq 0 ] && grep -q "rank 1" "$out/death_ep_rank0.log" || rc_ep=1
[ "$rc_ar" -eq 0 ] && [ "$rc_ep" -eq 0 ]
