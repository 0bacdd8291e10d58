#!/usr/bin/env bash
# Two builds of moelab against each other on one GPU, runs alternating
# (A B A B ...), so that a clock that drifts under the power cap (an H200
# runs the OLMoE layer at 1.68-1.98 GHz from one run to the next) falls on
# both alike; then each build's runs, mean, min and max, and the ratio of
# the means.
#
#   bash bench/gpu_ab.sh [-n ROUNDS] [-w WHAT] BIN_A BIN_B
#
# WHAT: layer (default; bench/gpu_moe_layer.lua, OLMoE shape, bf16,
# fwd+bwd TFLOP/s), step (bench/gpu_step.lua bf16 20 3 with bf16 moments,
# tokens/s), or grouped:SHAPE (bench/gpu_grouped.lua 20 5 SHAPE, TFLOP/s).
# ROUNDS: runs of each build (default 3). A run that prints no figure
# stops the comparison with its output.
#
# Making BIN_A, the baseline: build the old commit's program and keep a copy
# outside build/cuda (e.g. `git stash; make CUDA=1 build/cuda/moelab; strip
# --strip-debug -o build/moelab_base build/cuda/moelab; git stash pop`), then
# carry it to the GPU machine beside the bundle.
set -u
cd "$(dirname "$0")/.."
rounds=3 what=layer
while getopts "n:w:" o; do
    case $o in
    n) rounds=$OPTARG ;;
    w) what=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -ne 2 ]; then
    echo "usage: bash bench/gpu_ab.sh [-n ROUNDS] [-w layer|step|grouped:SHAPE] BIN_A BIN_B" >&2
    exit 2
fi
case $rounds in '' | *[!0-9]* | 0) echo "gpu_ab.sh: -n $rounds: expected a count of runs" >&2; exit 2 ;; esac
case $what in
layer | step | grouped:?*) ;;
*) echo "gpu_ab.sh: -w $what: expected layer, step or grouped:SHAPE" >&2; exit 2 ;;
esac
for b in "$1" "$2"; do
    [ -x "$b" ] || { echo "gpu_ab.sh: $b is not an executable program" >&2; exit 2; }
done
[ -f tools/device_env.sh ] && . tools/device_env.sh
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"

# one run of build $1: its output in $log, its figure on stdout (empty if none)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
figure() {
    case $what in
    layer)
        "$1" bench/gpu_moe_layer.lua cuda full olmoe bf16 >"$log" 2>&1
        awk -F'|' '$1 == "ROW" && $2 == "OLMoE" && $3 == "moelab nn.MoE" && $4 == "bf16" { print $8; exit }' "$log" ;;
    step)
        MOELAB_STEP_OPTIM_STATE=bf16 "$1" bench/gpu_step.lua bf16 20 3 >"$log" 2>&1
        awk '$1 == "mode" { getline; print $2; exit }' "$log" ;;
    grouped:*)
        "$1" bench/gpu_grouped.lua 20 5 "${what#grouped:}" >"$log" 2>&1
        awk '$NF ~ /^[0-9]+(\.[0-9]+)?$/ && $1 != "#" { v = $NF } END { print v }' "$log" ;;
    esac
}

a=() b=()
for ((r = 1; r <= rounds; r++)); do
    for side in A B; do
        bin=$1; [ $side = B ] && bin=$2
        v=$(figure "$bin")
        if [ -z "$v" ]; then
            echo "gpu_ab.sh: $bin ($side, round $r) printed no figure:" >&2
            cat "$log" >&2
            exit 1
        fi
        echo "round $r $side $v"
        if [ $side = A ]; then a+=("$v"); else b+=("$v"); fi
    done
done
awk -v what="$what" -v na="$1" -v nb="$2" -v A="${a[*]}" -v B="${b[*]}" 'BEGIN {
    n = split(A, x, " "); split(B, y, " ")
    for (s = 1; s <= 2; s++) {
        sum = 0; lo = 1e300; hi = -1e300
        for (i = 1; i <= n; i++) {
            v = (s == 1 ? x[i] : y[i]) + 0
            sum += v; if (v < lo) lo = v; if (v > hi) hi = v
        }
        m[s] = sum / n
        printf "%s %-40s mean %.1f  min %.1f  max %.1f  (%d runs)\n", (s == 1 ? "A" : "B"), (s == 1 ? na : nb), m[s], lo, hi, n
    }
    printf "%s: B / A = %.3f\n", what, m[2] / m[1]
}'
