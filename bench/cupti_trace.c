/* A timeline of a CUDA program for finding where the GPU sits idle, without
 * Nsight Systems (the GPU machine has none): preloaded into the program, it
 * records through CUPTI's activity API every kernel, memcpy and memset with
 * its GPU start and end, every CUDA runtime call with its host start and end,
 * and the correlation ids that tie a launch to its kernel. At exit it writes
 * them as CSV to $MOELAB_TRACE_OUT (default cupti_trace.csv); bench/trace_gaps.py
 * reads that. MOELAB_TRACE_API=0 leaves the runtime calls out (less host
 * overhead, no attribution of gaps to the host).
 *
 *   cc -O2 -shared -fPIC -I$CUDA_HOME/include -o build/libcupti_trace.so bench/cupti_trace.c \
 *      -L$CUDA_HOME/lib -lcupti
 *   LD_PRELOAD=build/libcupti_trace.so MOELAB_TRACE_OUT=t.csv build/cuda/moelab bench/gpu_step.lua bf16 12 3
 *
 * Rows: K,start,end,corr,name (kernels), M,start,end,corr,bytes,kind (memcpy),
 * S,start,end,corr,bytes (memset), R,start,end,corr,function (runtime calls);
 * times in ns on CUPTI's clock, which GPU and host records share. */
#include <cupti.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_BYTES (8u << 20)

static FILE *trace_out;

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUF_BYTES);
    *size = *buffer ? BUF_BYTES : 0;
    *max_records = 0;
}

static void write_record(const CUpti_Activity *r) {
    switch (r->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)r;
        fprintf(trace_out, "K,%llu,%llu,%u,%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                k->correlationId, k->name ? k->name : "?");
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)r;
        fprintf(trace_out, "M,%llu,%llu,%u,%llu,%u\n", (unsigned long long)m->start, (unsigned long long)m->end,
                m->correlationId, (unsigned long long)m->bytes, (unsigned)m->copyKind);
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
        const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)r;
        fprintf(trace_out, "S,%llu,%llu,%u,%llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
                m->correlationId, (unsigned long long)m->bytes);
        break;
    }
    case CUPTI_ACTIVITY_KIND_RUNTIME: {
        const CUpti_ActivityAPI *a = (const CUpti_ActivityAPI *)r;
        const char *name = NULL;
        if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name) != CUPTI_SUCCESS || !name) name = "?";
        fprintf(trace_out, "R,%llu,%llu,%u,%s\n", (unsigned long long)a->start, (unsigned long long)a->end,
                a->correlationId, name);
        break;
    }
    default:
        break;
    }
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    (void)ctx;
    (void)stream;
    (void)size;
    CUpti_Activity *r = NULL;
    while (trace_out && cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) write_record(r);
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS && dropped)
        fprintf(stderr, "cupti_trace: %zu records dropped\n", dropped);
    free(buffer);
}

#define TRY(x)                                                                                    \
    do {                                                                                          \
        CUptiResult r_ = (x);                                                                     \
        if (r_ != CUPTI_SUCCESS) {                                                                \
            const char *m_ = NULL;                                                                \
            cuptiGetResultString(r_, &m_);                                                        \
            fprintf(stderr, "cupti_trace: %s: %s (no trace)\n", #x, m_ ? m_ : "?");               \
            return;                                                                               \
        }                                                                                         \
    } while (0)

__attribute__((constructor)) static void trace_start(void) {
    const char *path = getenv("MOELAB_TRACE_OUT");
    trace_out = fopen(path && *path ? path : "cupti_trace.csv", "w");
    if (!trace_out) {
        perror("cupti_trace: the output file");
        return;
    }
    TRY(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed));
    TRY(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
    TRY(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY));
    TRY(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET));
    const char *api = getenv("MOELAB_TRACE_API");
    if (!api || strcmp(api, "0") != 0) TRY(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME));
}

__attribute__((destructor)) static void trace_stop(void) {
    if (!trace_out) return;
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    fclose(trace_out);
    trace_out = NULL;
}
