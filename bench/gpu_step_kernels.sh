#!/usr/bin/env bash
# Kernel-by-kernel GPU time of one training step of the OLMoE-style model
# (bench/gpu_step_kernels.lua) under Nsight Compute: each kernel of the
# profiled steps is timed alone (gpu__time_duration, clocks and caches left as
# they are), then bench/ncu_kernels.py sums them by kernel. The sum is the
# step's pure kernel time; the difference to the step's unprofiled wall time
# is what the GPU spends idle (host work, syncs, launch gaps).
#   bash bench/gpu_step_kernels.sh [warmup=3] [steps=2]
# Needs ncu on the PATH (the GPU machine has it) and build/cuda/moelab.
# Output in $OUT (else a temporary folder): ncu.csv, kernels.txt, order.txt.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d /tmp/gpu_step_kernels.XXXXXX)}
mkdir -p "$out"
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
warm=${1:-3}
steps=${2:-2}
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "bench/gpu_step_kernels.sh: no ncu found" >&2; exit 1; }
"$ncu" --profile-from-start off --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum --csv --print-units base \
    build/cuda/moelab bench/gpu_step_kernels.lua "$warm" "$steps" >"$out/ncu.csv" 2>"$out/ncu.err"
rc=$?
grep -v '^"' "$out/ncu.csv" | grep -v '^==PROF==' | tail -5
[ $rc -eq 0 ] || { echo "ncu exited $rc"; tail -20 "$out/ncu.err"; exit $rc; }
python3 bench/ncu_kernels.py "$out/ncu.csv" "$steps" --order "$out/order.txt" | tee "$out/kernels.txt"
