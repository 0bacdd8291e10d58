#!/bin/sh
# REPL start-up time: `echo 'print(1)' | ./moelab` (start, load `moe`, run one
# line, exit). Uses hyperfine when present, else the mean of 20 runs timed
# with date +%s%N. Usage: sh bench/startup.sh [path/to/moelab]
BIN=${1:-./moelab}
[ -x "$BIN" ] || { echo "startup.sh: $BIN is not built (run make)" >&2; exit 1; }
if command -v hyperfine >/dev/null 2>&1; then
    exec hyperfine --warmup 5 --runs 100 "echo 'print(1)' | $BIN"
fi
runs=20
echo 'print(1)' | "$BIN" >/dev/null # warm the page cache
start=$(date +%s%N)
i=0
while [ $i -lt $runs ]; do
    echo 'print(1)' | "$BIN" >/dev/null
    i=$((i + 1))
done
end=$(date +%s%N)
echo "moelab REPL start-up: $(( (end - start) / runs / 1000 )) us mean over $runs runs (echo 'print(1)' | $BIN)"
