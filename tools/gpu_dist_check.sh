#!/usr/bin/env bash
# Run on a machine with 2 GPUs after `make CUDA=1 build/cuda/moelab bundle`
# here, with build/cuda/moelab and build/cuda/lib carried: the NCCL
# communicator end to end (tools/gpu_dist_check.lua), two ranks launched
# without mpirun (RANK/WORLD_SIZE/LOCAL_RANK, one visible GPU per rank, the
# NCCL id through the file rendezvous MOELAB_DIST_RENDEZVOUS). Logs go to $OUT
# when set.   tools/gpu_dist_check.sh [throughput_steps]
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
export NCCL_NVLS_ENABLE=0   # never NVLink multicast (shared hosts)
out=${OUT:-/tmp}
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
ngpu=$(nvidia-smi -L | wc -l)
[ "$ngpu" -ge 2 ] || { echo "needs 2 GPUs, found $ngpu"; exit 1; }
echo "libnccl: $(ldconfig -p | grep -o '/.*libnccl\.so\.2' | head -1)$(for d in ${LD_LIBRARY_PATH//:/ }; do [ -e "$d/libnccl.so.2" ] && echo " $d/libnccl.so.2"; done | head -1)"
cp build/cuda/moelab ./moelab-cuda
rdv=$(mktemp -d /tmp/moelab_rdv.XXXXXX)
pids=()
for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 CUDA_VISIBLE_DEVICES=$r MOELAB_DIST_RENDEZVOUS=$rdv \
        NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT} \
        timeout "${MOELAB_CHECK_TIMEOUT:-400}" ./moelab-cuda tools/gpu_dist_check.lua "${1:-20}" >"$out/rank$r.log" 2>&1 &
    pids+=($!)
done
rc=0
for i in 0 1; do wait "${pids[$i]}" || { echo "rank $i exited with $?"; rc=1; }; done
rm -rf "$rdv"
echo "== NCCL (rank 0)"
grep -E "NCCL version|Channel 00|via P2P|via SHM|NET/" "$out/rank0.log" | head -4
for r in 0 1; do
    if grep -qiE "error|failed|traceback" "$out/rank$r.log"; then
        echo "== rank $r errors"; grep -iE "error|failed|traceback" "$out/rank$r.log" | grep -v "NCCL INFO" | head -8
    fi
done
echo "== results (2 x $(sed -n 1p "$out/gpu.txt" | cut -d, -f2 | sed 's/^ //'))"
printf '%-22s %-8s %s\n' check result detail
grep '^RESULT ' "$out/rank0.log" | while read -r _ name status detail; do printf '%-22s %-8s %s\n' "$name" "$status" "$detail"; done
grep -q '^DONE 0' "$out/rank0.log" && grep -q '^DONE 1' "$out/rank1.log" || rc=1
grep -q '^RESULT [a-z0-9_]* FAIL' "$out/rank0.log" && rc=1
exit $rc
