#!/bin/bash
# scratch: GPU tests, memory, A/B step against the base build
bash tools/gpu_bundle.sh unpack >/dev/null && . tools/device_env.sh
export MOELAB_LUA_PATH="$PWD/lua/?.lua;$PWD/lua/?/init.lua" NCCL_NVLS_ENABLE=0
xz -dc build/base/moelab.xz > build/cuda/moelab_base && chmod +x build/cuda/moelab_base
nvidia-smi --query-gpu=name --format=csv,noheader
bash tests/gpu/run.sh > $OUT/gpu_tests.txt 2>&1; tail -1 $OUT/gpu_tests.txt; grep "^not ok" $OUT/gpu_tests.txt | head
build/cuda/moelab bench/step_memory.lua bf16 8 2>&1 | tail -16
for i in 1 2; do
  echo "== new"; build/cuda/moelab bench/gpu_step.lua bf16 20 3 2>&1 | tail -4
  echo "== base"; MOELAB_LUA_PATH="$PWD/build/base/lua/?.lua;$PWD/build/base/lua/?/init.lua" build/cuda/moelab_base bench/gpu_step.lua bf16 20 3 2>&1 | tail -4
done
