#!/usr/bin/env bash
# On the GPU machine, with build/cuda carried (make CUDA=1 build/cuda/moelab gpu-tests bundle):
# the GPU tests, then the bf16 whole-step benchmark under the grouped-GEMM
# strategies of $STEP_STRATEGIES (auto and kernel), then the MoE layer benchmark in bf16. Each part has a time cap;
# logs go to $OUT. Usage: bash tools/gpu_fastpath.sh [tests|step|layer ...]
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
out=${OUT:-/tmp}
parts=${*:-tests step layer}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for p in $parts; do
    case $p in
    tests)
        echo "== tests/gpu"
        timeout "${TESTS_S:-240}" bash tests/gpu/run.sh build/cuda >"$out/tests.txt" 2>&1
        echo "rc=$?"; grep -E '^not ok|^# ' "$out/tests.txt" | head -80; tail -1 "$out/tests.txt" ;;
    step)
        for g in ${STEP_STRATEGIES:-auto kernel}; do
            echo "== gpu_step bf16, grouped GEMM $g"
            MOELAB_GROUPED_GEMM=$g timeout "${STEP_S:-150}" build/cuda/moelab bench/gpu_step.lua bf16 "${STEP_N:-20}" 5 \
                >"$out/step_bf16_$g.txt" 2>&1
            echo "rc=$?"; tail -4 "$out/step_bf16_$g.txt"
        done ;;
    step32)
        echo "== gpu_step f32"
        timeout "${STEP_S:-150}" build/cuda/moelab bench/gpu_step.lua f32 10 3 >"$out/step_f32.txt" 2>&1
        echo "rc=$?"; tail -4 "$out/step_f32.txt" ;;
    layer)
        echo "== gpu_moe_layer bf16"
        timeout "${LAYER_S:-200}" build/cuda/moelab bench/gpu_moe_layer.lua cuda full all bf16 >"$out/layer_bf16.txt" 2>&1
        echo "rc=$?"; grep -v '^ROW' "$out/layer_bf16.txt" | tail -30 ;;
    esac
done
