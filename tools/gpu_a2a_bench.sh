#!/usr/bin/env bash
# Issue 7: the expert-parallel token exchange alone (tools/gpu_a2a_bench.lua)
# on 2 GPUs, under NCCL settings that govern point-to-point transfers, to
# find what limits it. Run on the GPU machine with build/cuda carried.
#   bash tools/gpu_a2a_bench.sh
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
export NCCL_NVLS_ENABLE=0 NCCL_DEBUG=WARN
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
run() {
    local rdv pids=() r
    rdv=$(mktemp -d /tmp/moelab_rdv.XXXXXX)
    for r in 0 1; do
        env "$@" RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=$r MOELAB_DIST_RENDEZVOUS=$rdv \
            timeout 120 build/cuda/moelab tools/gpu_a2a_bench.lua >"/tmp/a2a_rank$r.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    rm -rf "$rdv"
    echo "== ${*:-defaults}"
    grep -h "^A2A" /tmp/a2a_rank0.log
    grep -hiE "error|fail" /tmp/a2a_rank*.log | head -3
}
run
run NCCL_BUFFSIZE=16777216
run NCCL_MIN_P2P_NCHANNELS=32 NCCL_MAX_P2P_NCHANNELS=32
run NCCL_MIN_NCHANNELS=32
run NCCL_P2P_NVL_CHUNKSIZE=2097152 NCCL_BUFFSIZE=16777216
run NCCL_PROTO=Simple
run NCCL_P2P_READ_ENABLE=1
