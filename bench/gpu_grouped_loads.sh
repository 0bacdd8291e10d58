#!/usr/bin/env bash
# The own grouped-GEMM kernel's three ways of loading the forward's tiles
# (MOELAB_GROUPED_LOADS = cp.async | tma | tma-multicast), on the GPU machine,
# after `bash tools/gpu_bundle.sh unpack`: check_grouped (every mode against the
# CPU), then per mode the grouped-GEMM timings of check_cuda (one GEMM shape
# set and the 9 GEMMs of a layer step) and whole training steps, alternating
# the modes so that drift shows. Full logs under $OUT (or /tmp); a table last.
#   bash bench/gpu_grouped_loads.sh [step-rounds=2]
cd "$(dirname "$0")/.." || exit 1
. tools/device_env.sh
export MOELAB_LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua"
out=${OUT:-/tmp}
rounds=${1:-2}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 180 build/cuda/tests/gpu/check_grouped >"$out/check_grouped.txt" 2>&1
echo "check_grouped rc=$?: $(tail -1 "$out/check_grouped.txt")"
grep '^not ok' "$out/check_grouped.txt" | head -5
modes="cp.async tma tma-multicast"
for m in $modes; do
    MOELAB_GROUPED_LOADS=$m MOELAB_CHECK_ONLY=time_grouped,time_moe_layer timeout 150 \
        build/cuda/tests/gpu/check_cuda >"$out/time_$m.txt" 2>&1
    echo "== $m (rc=$?)"; grep '^# gemm_grouped \|^# grouped .*layer step' "$out/time_$m.txt" | head -20
done
for r in $(seq "$rounds"); do
    for m in $modes; do
        MOELAB_GROUPED_LOADS=$m timeout 120 build/cuda/moelab bench/gpu_step.lua bf16 20 3 >"$out/step_${m}_$r.txt" 2>&1
        echo "step $m round $r (rc=$?): $(tail -1 "$out/step_${m}_$r.txt")"
    done
done
