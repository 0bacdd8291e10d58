#!/usr/bin/env bash
# Issue 8: EP=4 vs one GPU for the OLMoE-style 64-expert top-8 model (vocab
# 50304, hidden 1024, 8 layers, 16 heads, expert_intermediate_size 512; batch 8
# per GPU, AdamW, f32). Run on a machine with 4 GPUs after
# `make CUDA=1 build/cuda/moelab bundle` here, with build/cuda/moelab and
# build/cuda/lib carried. Four ranks launched without mpirun (as
# tools/gpu_dist_check.sh does), then the one-GPU baselines on GPU 0; each
# process trains the "aux" (default auxiliary loss) and "auxfree" configurations
# (tools/gpu_ep_scaling.lua). Logs go to $OUT when set.
#   tools/gpu_ep_scaling.sh            (MOELAB_EP_* variables: see the .lua)
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
export NCCL_NVLS_ENABLE=0   # never NVLink multicast (shared hosts)
out=${OUT:-/tmp}
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1 || true
ngpu=$(nvidia-smi -L | wc -l)
[ "$ngpu" -ge 4 ] || { echo "needs 4 GPUs, found $ngpu"; exit 1; }
[ -x ./moelab-cuda ] || cp build/cuda/moelab ./moelab-cuda
rdv=$(mktemp -d /tmp/moelab_rdv.XXXXXX)
t0=$(date +%s)
pids=()
for r in 0 1 2 3; do
    RANK=$r WORLD_SIZE=4 LOCAL_RANK=$r LOCAL_WORLD_SIZE=4 CUDA_VISIBLE_DEVICES=$r MOELAB_DIST_RENDEZVOUS=$rdv \
        NCCL_DEBUG=${NCCL_DEBUG:-INFO} NCCL_DEBUG_SUBSYS=${NCCL_DEBUG_SUBSYS:-INIT} \
        timeout "${MOELAB_EP_TIMEOUT:-260}" ./moelab-cuda tools/gpu_ep_scaling.lua ep >"$out/ep_rank$r.log" 2>&1 &
    pids+=($!)
done
rc=0
for i in 0 1 2 3; do wait "${pids[$i]}" || { echo "rank $i exited with $?"; rc=1; }; done
rm -rf "$rdv"
echo "EP4 phase: $(( $(date +%s) - t0 )) s"
t1=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout "${MOELAB_ONE_TIMEOUT:-220}" ./moelab-cuda tools/gpu_ep_scaling.lua one >"$out/one.log" 2>&1 || { echo "one-GPU run exited with $?"; rc=1; }
echo "1-GPU phase: $(( $(date +%s) - t1 )) s"
echo "== NCCL (rank 0)"
grep -E "NCCL version|Channel 00|via P2P|via SHM|NVLS|NET/" "$out/ep_rank0.log" | head -5
for f in "$out"/ep_rank*.log "$out/one.log"; do
    if grep -qiE "error|failed|traceback|out of memory" "$f"; then
        echo "== $(basename "$f") errors"; grep -iE "error|failed|traceback|out of memory" "$f" | grep -v "NCCL INFO" | head -8
    fi
done
echo "== results ($(sed -n 1p "$out/gpu.txt" | cut -d, -f2 | sed 's/^ //'))"
grep -hE '^(INFO|RESULT)' "$out/ep_rank0.log" "$out/one.log"
grep -q '^DONE 0' "$out/one.log" || rc=1
for r in 0 1 2 3; do grep -q "^DONE $r" "$out/ep_rank$r.log" || rc=1; done
exit $rc
