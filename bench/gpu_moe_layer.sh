#!/usr/bin/env bash
# MoE layer forward+backward throughput on one GPU: moelab (bench/gpu_moe_layer.lua,
# CUDA build, f32) against PyTorch baselines (bench/gpu_moe_layer_torch.py:
# transformers' OLMoE / Mixtral blocks, a torch._grouped_mm layer, dense GEMMs),
# in one run on the same card, then one markdown table.
#
# Builds nothing. Here: make CUDA=1 build/cuda/moelab bundle; on the GPU machine,
# with build/cuda/moelab and build/cuda/lib carried:
#   bash bench/gpu_moe_layer.sh [olmoe|mixtral]
# Logs and the table go to $OUT when set (else a fresh temporary folder).
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
. tools/clock_watch.sh
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out=${OUT:-$(mktemp -d /tmp/gpu_moe_layer.XXXXXX)}
mkdir -p "$out"
rm -f "$out/moelab_rows.txt" "$out/torch_rows.txt" "$out/clocks.txt"
export OUT="$out"
only=${1:-}
[ -x ./moelab-cuda ] || cp build/cuda/moelab ./moelab-cuda

card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
echo "card: $card" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv \
    | tee -a "$out/gpu.txt"

echo "== moelab (./moelab-cuda bench/gpu_moe_layer.lua, f32)"
clock_watch_start moelab
./moelab-cuda bench/gpu_moe_layer.lua cuda full $only 2>&1 | tee "$out/moelab.log"
clock_watch_stop moelab
echo "== PyTorch (python3 bench/gpu_moe_layer_torch.py)"
clock_watch_start torch
python3 bench/gpu_moe_layer_torch.py $only 2>&1 | tee "$out/torch.log"
clock_watch_stop torch

python3 - "$out" "$card" <<'EOF' | tee "$out/table.md"
import os, sys
out, card = sys.argv[1], sys.argv[2]
rows = []
for f in ("moelab_rows.txt", "torch_rows.txt"):
    p = os.path.join(out, f)
    if os.path.exists(p):
        rows += [l.rstrip("\n").split("|")[1:] for l in open(p) if l.startswith("ROW|")]
order = {"OLMoE": 0, "Mixtral": 1}
rows.sort(key=lambda r: order.get(r[0], 9))   # stable: moelab rows first within a shape
print(f"\n{card}; median of 10 after 3 warm-up; expert-GEMM TFLOP/s = 3 x 2*T*k*d*d_e (fwd), 3x that (fwd+bwd), over the whole layer time\n")
print("| shape | implementation | dtype | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    r = (r + [""] * 8)[:8]
    print("| " + " | ".join(r) + " |")
EOF
[ -f "$out/clocks.txt" ] && cat "$out/clocks.txt"
