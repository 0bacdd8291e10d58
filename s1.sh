#!/bin/bash
# scratch: GPU tests, memory, A/B of keeping the experts' rows
bash tools/gpu_bundle.sh unpack >/dev/null && . tools/device_env.sh
export MOELAB_LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua" NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name --format=csv,noheader
bash tests/gpu/run.sh > $OUT/gpu_tests.txt 2>&1; tail -1 $OUT/gpu_tests.txt; grep "^not ok" $OUT/gpu_tests.txt | head
build/cuda/moelab bench/step_memory.lua bf16 8 2>&1 | tail -16
for i in 1 2 3; do
  echo "== regather"; build/cuda/moelab bench/gpu_step.lua bf16 20 3 2>&1 | tail -3
  echo "== keep rows"; MOELAB_STEP_KEEP_ROWS=1 build/cuda/moelab bench/gpu_step.lua bf16 20 3 2>&1 | tail -3
done
