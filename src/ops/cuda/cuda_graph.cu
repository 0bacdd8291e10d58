// CUDA graphs of a device's stream (moe_cuda.h): capture, instantiate, replay.
//
// Why a pool of the graph's own: a graph holds the addresses its kernels were
// captured with. Blocks taken during the capture would, once freed, be handed
// by the shared pools to eager work, which a later replay would then
// overwrite. So from begin to end every allocation of the device comes from
// the graph's pair (cuda_alloc.cu take_locked), and a block goes back to the
// pair it came from whenever it is freed; the pair lives as long as the graph
// or its last block, whichever is later. Within the capture, blocks are
// reused in stream order, as eagerly: the captured work is one chain.
//
// The capture is "relaxed": the allocator may still cudaMalloc new segments
// during it (not a stream operation; the driver forbids it in the stricter
// modes). Stream synchronisations and host copies are refused by the ops
// themselves (CUDA_NOT_IN_CAPTURE, cuda_common.cuh) with a message that names them, before
// the driver would break the capture with a less telling one.
#include "cuda_common.cuh"
#include "moe_cuda.h"

#include <new>
#include <string.h>

struct moe_cuda_graph {
    cuda_dev *d;
    cuda_dev::pools *pools;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    bool capturing;
    size_t nodes;
    uint64_t launches;
};

extern "C" moe_status moe_cuda_graph_begin(moe_ctx *ctx, int device, moe_cuda_graph **out) {
    if (!out) return moe_error(MOE_ERR_ARG, "cuda graph: no output");
    *out = NULL;
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    moe_cuda_graph *g = new (std::nothrow) moe_cuda_graph();
    cuda_dev::pools *ps = new (std::nothrow) cuda_dev::pools{NULL, NULL, 0, false};
    if (!g || !ps) {
        delete g;
        delete ps;
        return moe_error(MOE_ERR_OOM, "cuda graph: out of host memory");
    }
    {
        std::lock_guard<std::mutex> lk(d->mu);
        if (d->capture) {
            delete g;
            delete ps;
            return moe_error(MOE_ERR_STATE, "cuda:%d is already capturing a graph (one capture at a time)", device);
        }
        d->graph_pools.push_back(ps);
        d->n_graphs++;
        g->d = d;
        g->pools = ps;
        // before the capture opens: an allocation from here on goes to the graph's pair
        d->capture = ps;
    }
    cudaError_t e = cudaStreamBeginCapture(d->stream, cudaStreamCaptureModeRelaxed);
    if (e != cudaSuccess) {
        cudaGetLastError();
        moe_cuda_graph_free(g);
        return moe_error(MOE_ERR_DEVICE, "cuda:%d: could not start capturing a graph: %s", device, cudaGetErrorString(e));
    }
    g->capturing = true;
    *out = g;
    return MOE_OK;
}

// Closes the capture (whatever its state) and stops the allocator's redirection.
static cudaError_t close_capture(moe_cuda_graph *g, cudaGraph_t *graph) {
    cuda_dev *d = g->d;
    *graph = NULL;
    cudaError_t e = cudaSuccess;
    if (g->capturing) {
        cudaSetDevice(d->index);
        e = cudaStreamEndCapture(d->stream, graph);
        if (e != cudaSuccess) cudaGetLastError();
        g->capturing = false;
    }
    std::lock_guard<std::mutex> lk(d->mu);
    if (d->capture == g->pools) d->capture = NULL;
    cuda_alloc_reap_locked(d);   // pairs retired during the capture
    return e;
}

extern "C" moe_status moe_cuda_graph_end(moe_ctx *ctx, moe_cuda_graph *g) {
    (void)ctx;
    if (!g) return moe_error(MOE_ERR_ARG, "cuda graph: NULL graph");
    if (!g->capturing) return moe_error(MOE_ERR_STATE, "cuda graph: not capturing (end called twice?)");
    cudaGraph_t graph = NULL;
    cudaError_t e = close_capture(g, &graph);
    if (e != cudaSuccess || !graph) {
        if (graph) cudaGraphDestroy(graph);
        return moe_error(MOE_ERR_DEVICE,
                         "cuda:%d: the graph's capture was broken (%s): an operation inside it waited for the "
                         "device or used another stream",
                         g->d->index, e != cudaSuccess ? cudaGetErrorString(e) : "no graph");
    }
    g->graph = graph;
    cudaGraphGetNodes(graph, NULL, &g->nodes);
    e = cudaGraphInstantiate(&g->exec, graph, 0);
    if (e != cudaSuccess) {
        cudaGetLastError();
        g->exec = NULL;
        return moe_error(MOE_ERR_DEVICE, "cuda:%d: the captured graph (%zu nodes) could not be instantiated: %s",
                         g->d->index, g->nodes, cudaGetErrorString(e));
    }
    return MOE_OK;
}

extern "C" moe_status moe_cuda_graph_launch(moe_ctx *ctx, moe_cuda_graph *g) {
    (void)ctx;
    if (!g || !g->exec) return moe_error(MOE_ERR_STATE, "cuda graph: nothing to launch (not captured, or the capture failed)");
    cuda_dev *d = g->d;
    if (d->capture) return moe_error(MOE_ERR_STATE, "cuda:%d: a graph cannot be launched while another is captured", d->index);
    CU_TRY(cudaSetDevice(d->index), "cuda graph launch");
    CU_TRY(cudaGraphLaunch(g->exec, d->stream), "cuda graph launch");
    g->launches++;
    return MOE_OK;
}

extern "C" void moe_cuda_graph_free(moe_cuda_graph *g) {
    if (!g) return;
    cuda_dev *d = g->d;
    cudaGraph_t graph = NULL;
    close_capture(g, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaSetDevice(d->index);
    if (g->exec) cudaGraphExecDestroy(g->exec);   // a queued replay still completes
    if (g->graph) cudaGraphDestroy(g->graph);
    cudaGetLastError();
    bool destroy;
    {
        std::lock_guard<std::mutex> lk(d->mu);
        g->pools->retired = true;
        cuda_alloc_reap_locked(d);
        d->n_graphs--;
        destroy = d->closing && d->live.empty() && !d->n_graphs;
    }
    delete g;
    if (destroy) cuda_dev_destroy(d);
}

extern "C" moe_status moe_cuda_graph_info(const moe_cuda_graph *g, size_t *nodes, uint64_t *launches,
                                          size_t *pool_bytes) {
    if (!g) return moe_error(MOE_ERR_ARG, "cuda graph: NULL graph");
    if (nodes) *nodes = g->nodes;
    if (launches) *launches = g->launches;
    if (pool_bytes) {
        std::lock_guard<std::mutex> lk(g->d->mu);
        *pool_bytes = cuda_pools_segment_bytes(*g->pools);
    }
    return MOE_OK;
}

extern "C" int moe_cuda_capturing(moe_ctx *ctx, int device) {
    cuda_dev *d = cuda_dev_get(ctx, moe_device{MOE_CUDA, device});
    if (!d) { moe_clear_error(); return 0; }
    std::lock_guard<std::mutex> lk(d->mu);
    return d->capture != NULL;
}

// ---- pinned mirrors of small device tensors (moe_cuda.h) ----
struct moe_cuda_mirror {
    cuda_dev *d;
    moe_tensor *t;
    void *host;          // pinned, nbytes
    size_t nbytes;
    cudaEvent_t done;    // recorded behind the last start's copy
    bool started;
};

extern "C" moe_status moe_cuda_mirror_new(moe_ctx *ctx, moe_tensor *t, moe_cuda_mirror **out) {
    if (!out) return moe_error(MOE_ERR_ARG, "cuda mirror: no output");
    *out = NULL;
    if (!t || t->device.type != MOE_CUDA || !moe_tensor_is_contiguous(t))
        return moe_error(MOE_ERR_ARG, "cuda mirror: expected a contiguous tensor on a CUDA device");
    CUDA_ENTER(d, ctx, t->device);
    const size_t nbytes = (size_t)moe_tensor_numel(t) * moe_dtype_size(t->dtype);
    if (nbytes == 0 || nbytes > ((size_t)16 << 20))
        return moe_error(MOE_ERR_ARG, "cuda mirror: %zu bytes, expected 1 byte to 16 MiB", nbytes);
    moe_cuda_mirror *m = new (std::nothrow) moe_cuda_mirror();
    if (!m) return moe_error(MOE_ERR_OOM, "cuda mirror: out of host memory");
    m->d = d;
    m->nbytes = nbytes;
    CU_TRY(cudaSetDevice(d->index), "cuda mirror");
    if (cudaHostAlloc(&m->host, nbytes, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        delete m;
        return moe_error(MOE_ERR_OOM, "cuda mirror: no pinned host memory for %zu bytes", nbytes);
    }
    if (cudaEventCreateWithFlags(&m->done, cudaEventDisableTiming) != cudaSuccess) {
        cudaGetLastError();
        cudaFreeHost(m->host);
        delete m;
        return moe_error(MOE_ERR_DEVICE, "cuda mirror: could not make an event");
    }
    moe_tensor_retain(t);
    m->t = t;
    *out = m;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_mirror_start(moe_ctx *ctx, moe_cuda_mirror *m) {
    (void)ctx;
    if (!m) return moe_error(MOE_ERR_ARG, "cuda mirror: NULL");
    cuda_dev *d = m->d;
    CUDA_NOT_IN_CAPTURE(d, "a mirror's copy to the host");
    if (m->started) return moe_error(MOE_ERR_STATE, "cuda mirror: started again before its last copy was finished");
    CU_TRY(cudaSetDevice(d->index), "cuda mirror");
    CU_TRY(cudaMemcpyAsync(m->host, moe_tensor_data(m->t), m->nbytes, cudaMemcpyDeviceToHost, d->stream),
           "cuda mirror");
    CU_TRY(cudaEventRecord(m->done, d->stream), "cuda mirror");
    m->started = true;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_mirror_finish(moe_ctx *ctx, moe_cuda_mirror *m, moe_tensor *dst) {
    (void)ctx;
    if (!m) return moe_error(MOE_ERR_ARG, "cuda mirror: NULL");
    if (!m->started) return moe_error(MOE_ERR_STATE, "cuda mirror: finish without a start");
    if (!dst || dst->device.type != MOE_CPU || !moe_tensor_is_contiguous(dst) || dst->dtype != m->t->dtype ||
        moe_tensor_numel(dst) != moe_tensor_numel(m->t))
        return moe_error(MOE_ERR_ARG, "cuda mirror: the destination must be a contiguous cpu tensor of the "
                                      "mirrored tensor's dtype and size");
    CUDA_NOT_IN_CAPTURE(m->d, "a mirror's wait");
    m->started = false;
    CU_TRY(cudaEventSynchronize(m->done), "cuda mirror");
    memcpy(moe_tensor_data(dst), m->host, m->nbytes);
    moe_tensor_mark_written(dst);   // see tensor.h
    return MOE_OK;
}

extern "C" void moe_cuda_mirror_free(moe_cuda_mirror *m) {
    if (!m) return;
    cudaSetDevice(m->d->index);
    if (m->started) cudaEventSynchronize(m->done);   // the copy still writes the pinned memory
    cudaEventDestroy(m->done);
    cudaFreeHost(m->host);
    cudaGetLastError();
    moe_tensor_release(m->t);
    delete m;
}
