# Sourced by the GPU benchmark scripts: samples the SM clock, power and the
# reasons holding the clock down while one phase of a benchmark runs, then
# prints a line from bench/clock_summary.py (an H200 runs the OLMoE layer
# power-capped at about 1.7 GHz: a figure needs the clock it ran at).
#   clock_watch_start NAME   (samples into $out/clocks_NAME.csv every 100 ms)
#   clock_watch_stop NAME    (stops; prints and appends to $out/clocks.txt)
# Without nvidia-smi both do nothing.
clock_watch_start() {
    clock_watch_pid=
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv --loop-ms=100 >"$out/clocks_$1.csv" 2>/dev/null &
    clock_watch_pid=$!
}
clock_watch_stop() {
    [ -n "${clock_watch_pid:-}" ] || return 0
    kill "$clock_watch_pid" 2>/dev/null
    wait "$clock_watch_pid" 2>/dev/null
    clock_watch_pid=
    echo "clocks, $1: $(python3 bench/clock_summary.py "$out/clocks_$1.csv")" | tee -a "$out/clocks.txt"
}
