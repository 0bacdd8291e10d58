#!/bin/sh
# CPU training throughput, moelab against PyTorch eager on the same model,
# batch and thread count, measured back to back in one run:
#   bench/cpu_train.lua (moe.arch.Mixtral + moe.MoETrainer on the built-in corpus)
#   bench/torch_moe.py  (the same architecture in PyTorch, random token batches)
# for the "quickstart" and "mixtral20m" configurations. First each config is
# checked for sameness (PyTorch replays moelab's weights and batch: losses and
# gradients must agree), then every measurement runs ROUNDS times, interleaved,
# and a markdown table of the median tokens/s per round is printed.
#
#   sh bench/cpu_train.sh                     # 5 warmup + 30 timed steps, 2 rounds, 2 threads
#   STEPS=10 ROUNDS=1 sh bench/cpu_train.sh
#
# Environment: PYTHON (a python with torch; default python3), MOELAB (a
# non-sanitizer moelab binary; default build/cpu/moelab, built if missing),
# THREADS (2), STEPS (30), WARMUP (5), ROUNDS (2), OUT (results folder;
# default a fresh temporary one). torch is not a moelab dependency: install it
# for the benchmark only (pip install torch).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-5}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-$(mktemp -d /tmp/cpu_train.XXXXXX)}
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "cpu_train.sh: $PYTHON cannot import torch (pip install torch, or set PYTHON=...)" >&2
    exit 1
fi
# build/cpu/moelab rather than ./moelab: `make asan` replaces ./moelab with a
# sanitizer build. A private copy keeps a rebuild during the run out of the way.
MOELAB=${MOELAB:-build/cpu/moelab}
if [ ! -x "$MOELAB" ]; then make "$MOELAB" >&2; fi
if ldd "$MOELAB" | grep -q 'libasan\|libubsan'; then
    echo "cpu_train.sh: $MOELAB is a sanitizer build; give a release one (MOELAB=build/cpu/moelab)" >&2
    exit 1
fi
cp "$MOELAB" "$OUT/moelab"
MOELAB_LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua"
export MOELAB_LUA_PATH
export MOELAB_NUM_THREADS="$THREADS"

CONFIGS="quickstart mixtral20m"
TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__)')
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "cpu: $CPU, $(nproc) online"
    echo "threads: $THREADS; steps: $WARMUP warmup + $STEPS timed; rounds: $ROUNDS"
    # OpenBLAS picks its GEMM kernels from the CPU unless OPENBLAS_CORETYPE names them
    echo "OPENBLAS_CORETYPE: ${OPENBLAS_CORETYPE:-(unset: OpenBLAS detects the CPU)}"
    echo "moelab: $MOELAB ($("$OUT/moelab" --version 2>/dev/null || echo '?'), tree $(git describe --always --dirty 2>/dev/null || echo '?')); torch: $TORCH_VERSION"
} | tee "$OUT/info.txt"

echo "== sameness check (PyTorch replays moelab's weights and batch)"
for c in $CONFIGS; do
    "$OUT/moelab" bench/cpu_train.lua --config "$c" --dump "$OUT/dump_$c" >/dev/null
    "$PYTHON" bench/torch_moe.py --config "$c" --threads "$THREADS" --check "$OUT/dump_$c" | grep -v '^    '
done

# What else ran: CPU time of the whole machine (/proc/stat) minus this
# script's children's, over each measurement. More than a few percent of the
# cores means another job shared the machine: rerun that round.
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# `times` must run in this shell itself (a $(...) subshell has no children yet)
kids_to() { times >"$1"; }
kids_of() { awk 'NR == 2 {split($1, a, /[ms]/); split($2, b, /[ms]/); print (a[1] * 60 + a[2] + b[1] * 60 + b[2]) * 100}' "$1"; }
now() { date +%s.%N; }
measure() {
    label=$1; log=$2; shift 2
    echo "== $label"
    kids_to "$OUT/.times0"; b0=$(busy); t0=$(now)
    "$@" >"$log"
    b1=$(busy); t1=$(now); kids_to "$OUT/.times1"
    k0=$(kids_of "$OUT/.times0"); k1=$(kids_of "$OUT/.times1")
    tail -n 3 "$log"
    awk -v b="$((b1 - b0))" -v k0="$k0" -v k1="$k1" -v t0="$t0" -v t1="$t1" -v n="$(nproc)" -v l="$label" 'BEGIN {
        o = (b - (k1 - k0)) / 100; if (o < 0) o = 0; w = t1 - t0
        printf "   other processes: %.1f CPU-s in %.1f s (%.1f%% of %d cores)\n", o, w, 100 * o / (w * n), n
        if (o / (w * n) > 0.05) printf "   WARNING: the machine was not idle during %s\n", l
    }' | tee -a "$OUT/interference.txt"
}
for r in $(seq 1 "$ROUNDS"); do
    for c in $CONFIGS; do
        measure "round $r, $c, moelab" "$OUT/moelab_${c}_$r.log" \
            "$OUT/moelab" bench/cpu_train.lua --config "$c" --steps "$STEPS" --warmup "$WARMUP" \
            --json "$OUT/moelab_${c}_$r.json"
        measure "round $r, $c, PyTorch" "$OUT/torch_${c}_$r.log" \
            "$PYTHON" bench/torch_moe.py --config "$c" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" \
            --json "$OUT/torch_${c}_$r.json" --moelab-json "$OUT/moelab_${c}_$r.json"
    done
done

echo
"$PYTHON" - "$OUT" "$ROUNDS" $CONFIGS <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out, rounds, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def rate(impl, c, r):
    return json.load(open(os.path.join(out, f"{impl}_{c}_{r}.json")))["tokens_per_s_median"]
runs = " | ".join(f"tokens/s (median), run {r}" for r in range(1, rounds + 1))
print(f"| config | params | implementation | {runs} | moelab/PyTorch |")
print("|---|---|---|" + "---|" * rounds + "---|")
for c in configs:
    params = json.load(open(os.path.join(out, f"moelab_{c}_1.json")))["params"]
    m = [rate("moelab", c, r) for r in range(1, rounds + 1)]
    t = [rate("torch", c, r) for r in range(1, rounds + 1)]
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(m, t))
    print(f"| {c} | {params / 1e6:.2f}M | moelab | " + " | ".join(f"{x:,.0f}" for x in m) + f" | {ratios} |")
    print(f"| {c} | {params / 1e6:.2f}M | PyTorch | " + " | ".join(f"{x:,.0f}" for x in t) + " | |")
EOF
echo "results: $OUT"
