#!/bin/sh
# Runs every C test binary and every busted spec, then prints the totals as
# the last line: "N passed, N failed". Both report in TAP ("ok N - ...").
BUILD=${1:-build/cpu}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
for t in "$BUILD"/tests/*; do
    [ -x "$t" ] || continue
    echo "== $t"
    "$t" >"$log.c" 2>&1; rc=$?
    cat "$log.c"; cat "$log.c" >>"$log"
    if [ $rc -ne 0 ] && ! grep -q '^not ok' "$log.c"; then
        echo "not ok - $t exited with status $rc" | tee -a "$log"
    fi
    rm -f "$log.c"
done
echo "== busted"
./moelab tests/busted.lua -o TAP tests/ >"$log.b" 2>&1; rc=$?
cat "$log.b"; cat "$log.b" >>"$log"
if [ $rc -ne 0 ] && ! grep -q '^not ok' "$log.b"; then
    echo "not ok - busted exited with status $rc" | tee -a "$log"
fi
rm -f "$log.b"
# a TAP "ok ... # SKIP" is a check that did not run: count it apart, never as passed
skipped=$(grep -E '^ok ' "$log" | grep -c -i '# skip')
passed=$(( $(grep -c '^ok ' "$log") - skipped ))
failed=$(grep -c '^not ok' "$log")
[ "$failed" -eq 0 ] || status=1
if [ "$skipped" -gt 0 ]; then
    echo "skipped:"; grep -E '^ok ' "$log" | grep -i '# skip' | sed 's/^/  /'
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
exit $status
