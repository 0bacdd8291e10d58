#!/usr/bin/env bash
# Issue 7: data and expert parallel throughput against one GPU, on the
# OLMoE-style model of the CUDA issue (vocab 50304, d 1024, 8 layers, 16 heads,
# 32 experts of 512, top-4; batch 8 x 1024 per GPU; bf16 mixed precision by
# default). For each expert-parallel size in EP_SIZES (1 = pure DP) runs
# NGPU ranks (NCCL, file rendezvous, no mpirun) of tools/gpu_ep_scaling.lua,
# then the one-GPU baseline. Run on the GPU machine with build/cuda carried.
#   NGPU=2 EP_SIZES="1 2" bash tools/gpu_dist_bench.sh
# An EP_SIZES entry "2:assignments" runs EP=2 with MOELAB_EP_EXCHANGE=assignments
# (one row per kept choice instead of one per token and owning rank);
# "2:tokens" with MOELAB_EP_EXCHANGE=tokens (token rows by all-to-all instead
# of the trainer's all_gather dispatch at EP=2); "2:no_overlap" with
# MOELAB_EP_OVERLAP=0 (the experts' weight gradients not overlapped with the
# exchange of their input gradients).
# Other knobs: MOELAB_EP_* of tools/gpu_ep_scaling.lua (defaults set here:
# EXPERTS=32, TOPK=4, PRECISION=bf16, GROUPS=NGPU, CONFIGS=aux, PHASE_S=45).
set -u
cd "$(dirname "$0")/.."
. tools/device_env.sh
export NCCL_NVLS_ENABLE=0   # never NVLink multicast (shared hosts)
export MOELAB_LUA_PATH="${MOELAB_LUA_PATH:-$PWD/lua/?.lua;$PWD/lua/?/init.lua}"
out=${OUT:-/tmp}
n=${NGPU:-2}
export MOELAB_EP_EXPERTS=${MOELAB_EP_EXPERTS:-32} MOELAB_EP_TOPK=${MOELAB_EP_TOPK:-4}
export MOELAB_EP_PRECISION=${MOELAB_EP_PRECISION:-bf16} MOELAB_EP_GROUPS=${MOELAB_EP_GROUPS:-$n}
export MOELAB_EP_CONFIGS=${MOELAB_EP_CONFIGS:-aux} MOELAB_EP_PHASE_S=${MOELAB_EP_PHASE_S:-45}
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1 || true
have=$(nvidia-smi -L | wc -l)
[ "$have" -ge "$n" ] || { echo "needs $n GPUs, found $have"; exit 1; }
rc=0
for spec in ${EP_SIZES:-1 $n}; do
    # "2" or "2:assignments" (MOELAB_EP_EXCHANGE for that run: the A/B of the EP exchange)
    ep=${spec%%:*}; variant=; [[ $spec == *:* ]] && variant=${spec#*:}
    xch=; ovl=
    case $variant in
        '') ;;
        assignments|tokens) xch=$variant ;;
        no_overlap) ovl=0 ;;
        *) echo "unknown EP_SIZES variant '$variant' (assignments, tokens, no_overlap)"; exit 2 ;;
    esac
    tag=ep${ep}${variant:+_$variant}
    rdv=$(mktemp -d /tmp/moelab_rdv.XXXXXX)
    t0=$(date +%s)
    pids=()
    for ((r = 0; r < n; r++)); do
        RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n CUDA_VISIBLE_DEVICES=$r MOELAB_DIST_RENDEZVOUS=$rdv \
            MOELAB_EP_SIZE=$ep MOELAB_EP_EXCHANGE=$xch MOELAB_EP_OVERLAP=$ovl timeout "${MOELAB_EP_TIMEOUT:-200}" build/cuda/moelab tools/gpu_ep_scaling.lua ep \
            >"$out/${tag}_rank$r.log" 2>&1 &
        pids+=($!)
    done
    for ((r = 0; r < n; r++)); do wait "${pids[$r]}" || { echo "ep=$ep rank $r exited with $?"; rc=1; }; done
    rm -rf "$rdv"
    echo "== world $n, ep $ep${variant:+, $variant} ($(( $(date +%s) - t0 )) s)"
    grep -hE '^(INFO|RESULT)' "$out/${tag}_rank0.log"
    grep -iE "error|failed|traceback|out of memory" "$out/${tag}_rank"*.log | grep -v "NCCL INFO" | head -5
done
t1=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout "${MOELAB_ONE_TIMEOUT:-150}" build/cuda/moelab tools/gpu_ep_scaling.lua one >"$out/one.log" 2>&1 \
    || { echo "one-GPU run exited with $?"; rc=1; }
echo "== one GPU ($(( $(date +%s) - t1 )) s)"
grep -hE '^(INFO|RESULT)' "$out/one.log"
exit $rc
