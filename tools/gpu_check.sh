#!/usr/bin/env bash
# Run on the GPU machine after `make CUDA=1 build/cuda/moelab gpu-tests` and
# `bash tools/gpu_bundle.sh pack` here, with the bundle carried and unpacked:
# checks the CUDA kernels against the CPU path (check_cuda, check_cuda_nn; the
# whole suite is tests/gpu/run.sh) and smoke-tests the CUDA program. Logs go to
# $OUT when set.
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for t in check_cuda check_cuda_nn; do
    echo "== $t"
    MOELAB_CHECK_NO_TIMING=1 build/cuda/tests/gpu/$t 2>&1 | tee "$out/$t.txt" | grep -v '^ok'
    echo "$t: $(grep -c '^ok' "$out/$t.txt") ok, $(grep -c '^not ok' "$out/$t.txt") not ok"
done
cp build/cuda/moelab ./moelab-cuda
echo "== moelab (CUDA build) smoke"
./moelab-cuda --version
./moelab-cuda -e '
print("cuda available:", moe.cuda_available(), "devices:", moe.cuda_device_count())
local a = moe.randn({64, 32}, {seed = 1})
local b = moe.randn({32, 16}, {seed = 2})
local ga, gb = a:to("cuda"), b:to("cuda")
local c = a:matmul(b)
local gc = ga:matmul(gb):to("cpu")
print("matmul cpu vs cuda allclose:", c:allclose(gc, 1e-4, 1e-4))
local r1 = moe.randn({1000}, {seed = 7})
local r2 = moe.randn({1000}, {seed = 7, device = "cuda"}):to("cpu")
print("randn same on both devices:", r1:allclose(r2, 1e-5, 1e-6))
local x = moe.randn({8, 100}, {seed = 3})
print("softmax cpu vs cuda:", x:softmax():allclose(x:to("cuda"):softmax():to("cpu"), 1e-5, 1e-6))
local bf = ga:to("bf16")
print("bf16 tensor:", bf:dtype(), bf:device())
' 2>&1 | tee "$out/smoke.txt"
