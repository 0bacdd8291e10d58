#!/usr/bin/env bash
# Whole training step of the OLMoE-style model on one GPU: the PyTorch /
# transformers baseline (bench/gpu_step_torch.py: grouped_mm, torch.compile and
# per-expert-loop experts, bf16, fused AdamW), then moelab (bench/gpu_step.lua
# on the CUDA build, when that script exists), in one run on the same card;
# both tables are printed again at the end.
#
# Builds nothing. Here: make CUDA=1 build/cuda/moelab bundle; on the GPU machine,
# with build/cuda/moelab and build/cuda/lib carried:
#   bash bench/gpu_step.sh
# Environment knobs (defaults keep the whole run under about 9 minutes on an H100):
#   STEP_STEPS=20    timed steps per PyTorch mode
#   STEP_WARMUP=     PyTorch warm-up steps (empty: 5, and 10 for compile)
#   TORCH_BUDGET_S=330   wall-clock budget for all PyTorch modes together
#                        (per mode at most 150 s, compile 300 s, eager loop 200 s)
#   TOTAL_BUDGET_S=530   the moelab run is cut off at this many seconds from the start
#   MOELAB_STEP_ARGS=    arguments for bench/gpu_step.lua (its defaults when empty)
#   STEP_ARGS=       more arguments for gpu_step_torch.py (a CPU smoke test:
#                    STEP_ARGS="--device cpu --layers 1 --seq 64 --batch 2" STEP_STEPS=2)
# Logs, the JSON and the tables go to $OUT when set (else a fresh temporary folder).
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
. tools/clock_watch.sh
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out=${OUT:-$(mktemp -d /tmp/gpu_step.XXXXXX)}
mkdir -p "$out"
export OUT="$out"
SECONDS=0

card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${card:-unknown (nvidia-smi failed)}" | tee "$out/gpu.txt"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv \
    2>/dev/null | tee -a "$out/gpu.txt"

echo "== PyTorch (python3 bench/gpu_step_torch.py --mode all)"
warm=()
[ -n "${STEP_WARMUP:-}" ] && warm=(--warmup "$STEP_WARMUP")
rm -f "$out/clocks.txt"
clock_watch_start torch
python3 bench/gpu_step_torch.py --mode all --out "$out/gpu_step_torch.json" \
    --steps "${STEP_STEPS:-20}" ${warm[@]+"${warm[@]}"} --deadline-s "${TORCH_BUDGET_S:-330}" ${STEP_ARGS:-} 2>&1 \
    | tee "$out/gpu_step_torch.log"
clock_watch_stop torch
torch_rc=${PIPESTATUS[0]}
echo "(PyTorch part: exit $torch_rc, ${SECONDS} s so far)"

echo "== moelab (build/cuda/moelab bench/gpu_step.lua)"
moelab=build/cuda/moelab
[ -x "$moelab" ] || moelab=./moelab-cuda
# the binary looks for its Lua sources in lua/ next to itself; point it at the
# checkout's lua/ (searched first) so that an unbundled build/cuda works too
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
left=$(( ${TOTAL_BUDGET_S:-530} - SECONDS ))
if [ ! -f bench/gpu_step.lua ]; then
    echo "skipped: bench/gpu_step.lua does not exist yet" | tee "$out/gpu_step_moelab.txt"
elif [ ! -x "$moelab" ]; then
    echo "skipped: no build/cuda/moelab (build it with make CUDA=1 and carry build/cuda)" | tee "$out/gpu_step_moelab.txt"
elif [ "$left" -lt 30 ]; then
    echo "skipped: only ${left} s of the ${TOTAL_BUDGET_S:-530} s budget left" | tee "$out/gpu_step_moelab.txt"
else
    clock_watch_start moelab
    timeout "$left" "$moelab" bench/gpu_step.lua ${MOELAB_STEP_ARGS:-} 2>&1 | tee "$out/gpu_step_moelab.txt"
    rc=${PIPESTATUS[0]}
    clock_watch_stop moelab
    [ "$rc" -eq 124 ] && echo "(moelab run cut off after ${left} s)" | tee -a "$out/gpu_step_moelab.txt"
    [ "$rc" -ne 0 ] && echo "(moelab exited $rc)" | tee -a "$out/gpu_step_moelab.txt"
fi

echo
echo "==================== PyTorch / transformers (card: ${card:-unknown})"
sed -n '/^TABLE BEGIN$/,/^TABLE END$/p' "$out/gpu_step_torch.log" | sed '1d;$d'
echo
echo "==================== moelab (last 40 lines of $out/gpu_step_moelab.txt)"
tail -n 40 "$out/gpu_step_moelab.txt"
echo
[ -f "$out/clocks.txt" ] && cat "$out/clocks.txt"
echo "total ${SECONDS} s; logs in $out"
