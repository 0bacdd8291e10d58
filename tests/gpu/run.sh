#!/usr/bin/env bash
# Runs the GPU tests of a CUDA build: every $BUILD/tests/gpu/check_* program
# and every tests/gpu/*_gpu.lua (with $BUILD/moelab), all printing TAP.
# Usage: bash tests/gpu/run.sh [build/cuda]. Last line: "N passed, N failed"
# (", N skipped" when some were). Exit 1 when anything failed.
cd "$(dirname "$0")/../.." || exit 1
build=${1:-build/cuda}
[ -f tools/device_env.sh ] && . tools/device_env.sh
# the program looks for its Lua sources in lua/ next to itself: use the checkout's
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
st=0
for t in "$build"/tests/gpu/check_*; do
    [ -x "$t" ] || continue
    echo "== $t"
    "$t" >"$log" 2>&1 || st=1
    cat "$log"
    cat "$log" >>"$log.all"
done
for t in tests/gpu/*_gpu.lua; do
    [ -f "$t" ] || continue
    echo "== $t"
    "$build/moelab" "$t" >"$log" 2>&1 || st=1
    cat "$log"
    cat "$log" >>"$log.all"
done
touch "$log.all"
okc=$(grep -c '^ok' "$log.all")
okskip=$(grep -c '^ok.*# SKIP' "$log.all")
skip=$((okskip + $(grep -c '^1\.\.0 # SKIP' "$log.all")))
fail=$(grep -c '^not ok' "$log.all")
pass=$((okc - okskip))
rm -f "$log.all"
if [ "$skip" -gt 0 ]; then echo "$pass passed, $fail failed, $skip skipped"; else echo "$pass passed, $fail failed"; fi
[ "$st" -eq 0 ] && [ "$fail" -eq 0 ]
