#!/usr/bin/env bash
# Issue 7 (failure behaviour over NCCL): two ranks with the file rendezvous;
# rank 1 exits right after a first all_reduce; rank 0's next all_reduce must
# fail naming rank 1 (heartbeats, MOELAB_DIST_HEARTBEAT_S, default 15 s)
# long before the 120 s collective timeout. Run on a 2-GPU machine with
# build/cuda/moelab carried.
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
exit $rc0
