// copy (host<->device, device<->device, any strides, dtype conversion on the
// device) and fill.
//
// Conversions follow moe_dtype_load / moe_dtype_store of the CPU: values pass
// through double; bf16/f16 round from f32 to nearest even; integer stores
// saturate and map NaN to 0.
#include "cuda_common.cuh"
#include "moe_cuda.h"

#include <string.h>

__device__ __forceinline__ double load_any(int dt, const char *base, int64_t i) {
    switch (dt) {
    case MOE_F32: return ((const float *)base)[i];
    case MOE_F64: return ((const double *)base)[i];
    case MOE_BF16: return __bfloat162float(((const bf16 *)base)[i]);
    case MOE_F16: return __half2float(((const __half *)base)[i]);
    case MOE_I32: return ((const int32_t *)base)[i];
    case MOE_I64: return (double)((const int64_t *)base)[i];
    case MOE_U8: return ((const uint8_t *)base)[i];
    case MOE_I8: return ((const int8_t *)base)[i];
    case MOE_I16: return ((const int16_t *)base)[i];
    default: return 0.0;
    }
}

__device__ __forceinline__ double clampd(double v, double lo, double hi) {
    if (v != v) return 0;
    return v < lo ? lo : v > hi ? hi : v;
}

__device__ __forceinline__ void store_any(int dt, char *base, int64_t i, double v) {
    switch (dt) {
    case MOE_F32: ((float *)base)[i] = (float)v; break;
    case MOE_F64: ((double *)base)[i] = v; break;
    case MOE_BF16: ((bf16 *)base)[i] = __float2bfloat16_rn((float)v); break;
    case MOE_F16: ((__half *)base)[i] = __float2half_rn((float)v); break;
    case MOE_I32: ((int32_t *)base)[i] = (int32_t)clampd(v, -2147483648.0, 2147483647.0); break;
    case MOE_I64: ((int64_t *)base)[i] = (int64_t)clampd(v, -9223372036854775808.0, 9223372036854774784.0); break;
    case MOE_U8: ((uint8_t *)base)[i] = (uint8_t)clampd(v, 0, 255); break;
    case MOE_I8: ((int8_t *)base)[i] = (int8_t)clampd(v, -128, 127); break;
    case MOE_I16: ((int16_t *)base)[i] = (int16_t)clampd(v, -32768, 32767); break;
    default: break;
    }
}

// Any dtypes, any layouts (the i-th element of src goes to the i-th of dst).
__global__ void k_convert(char *dst, int ddt, cuda_layout dl, const char *src, int sdt, cuda_layout sl, int64_t n) {
    GRID_STRIDE(i, n) store_any(ddt, dst, cuda_offset(dl, i), load_any(sdt, src, cuda_offset(sl, i)));
}

// Same dtype, some layout not flat: moves raw elements of E bytes.
template <typename E>
__global__ void k_gather(E *dst, cuda_layout dl, const E *src, cuda_layout sl, int64_t n) {
    GRID_STRIDE(i, n) dst[cuda_offset(dl, i)] = src[cuda_offset(sl, i)];
}

// The common casts, flat.
__global__ void k_f32_to_bf16(bf16 *dst, const float *src, int64_t n) {
    GRID_STRIDE(i, n) dst[i] = __float2bfloat16_rn(src[i]);
}
__global__ void k_bf16_to_f32(float *dst, const bf16 *src, int64_t n) {
    GRID_STRIDE(i, n) dst[i] = __bfloat162float(src[i]);
}

// dst (on d's device, layout dl) = src (on d's device, layout sl), n elements.
static moe_status convert_on_device(cuda_dev *d, void *dst, moe_dtype ddt, const cuda_layout &dl, const void *src,
                                    moe_dtype sdt, const cuda_layout &sl, int64_t n) {
    if (n == 0) return MOE_OK;
    unsigned grid = cuda_grid_1d(d, n, 256);
    bool flat = cuda_layout_is_flat(dl) && cuda_layout_is_flat(sl);
    if (ddt == sdt) {
        size_t es = moe_dtype_size(ddt);
        if (flat) {
            CU_TRY(cudaMemcpyAsync(dst, src, (size_t)n * es, cudaMemcpyDeviceToDevice, d->stream), "copy");
            return MOE_OK;
        }
        switch (es) {
        case 1: k_gather<uint8_t><<<grid, 256, 0, d->stream>>>((uint8_t *)dst, dl, (const uint8_t *)src, sl, n); break;
        case 2: k_gather<uint16_t><<<grid, 256, 0, d->stream>>>((uint16_t *)dst, dl, (const uint16_t *)src, sl, n); break;
        case 4: k_gather<uint32_t><<<grid, 256, 0, d->stream>>>((uint32_t *)dst, dl, (const uint32_t *)src, sl, n); break;
        default: k_gather<uint64_t><<<grid, 256, 0, d->stream>>>((uint64_t *)dst, dl, (const uint64_t *)src, sl, n); break;
        }
        CU_LAUNCHED("copy (strided)");
        return MOE_OK;
    }
    if (flat && sdt == MOE_F32 && ddt == MOE_BF16)
        k_f32_to_bf16<<<grid, 256, 0, d->stream>>>((bf16 *)dst, (const float *)src, n);
    else if (flat && sdt == MOE_BF16 && ddt == MOE_F32)
        k_bf16_to_f32<<<grid, 256, 0, d->stream>>>((float *)dst, (const bf16 *)src, n);
    else
        k_convert<<<grid, 256, 0, d->stream>>>((char *)dst, ddt, dl, (const char *)src, sdt, sl, n);
    CU_LAUNCHED("copy (convert)");
    return MOE_OK;
}

// Small host->device copies (the batch's ids and targets every step) go through
// pinned staging slots: the bytes are copied into a slot at once, so the caller
// may free them when the call returns, and the transfer is queued without a
// stream synchronisation. From pageable memory the transfer had to be waited
// for, which drained the GPU's queue at the start of every training step (the
// optimizer's 5 ms were still running) and left it idle while the host queued
// the next forward. A slot is reused once the event of its previous transfer
// has completed (with 8 slots a wait is rare). Larger copies, and a device
// where the pinned memory cannot be had, keep the synchronous path.
constexpr int STAGE_SLOTS = 8;
constexpr size_t STAGE_SLOT_BYTES = (size_t)1 << 20;
static_assert(sizeof(((cuda_dev *)nullptr)->stage_done) / sizeof(cudaEvent_t) == STAGE_SLOTS, "one event a slot");

// n slots of pinned memory (bytes in all) and an event each, made on first use
// (under d->stage_mu); false, and not tried again, when they cannot be had.
static bool pinned_slots(unsigned char **mem, cudaEvent_t *done, int n, size_t bytes, bool *failed) {
    if (*mem) return true;
    if (*failed) return false;
    void *h = nullptr;
    int made = 0;
    if (cudaHostAlloc(&h, bytes, cudaHostAllocPortable) == cudaSuccess)
        for (; made < n; made++)
            if (cudaEventCreateWithFlags(&done[made], cudaEventDisableTiming) != cudaSuccess) break;
    if (made < n) {
        (void)cudaGetLastError();
        for (int i = 0; i < made; i++) cudaEventDestroy(done[i]);
        if (h) cudaFreeHost(h);
        *failed = true;
        return false;
    }
    *mem = (unsigned char *)h;
    return true;
}

static bool stage_ready(cuda_dev *d) {
    return pinned_slots(&d->stage, d->stage_done, STAGE_SLOTS, STAGE_SLOTS * STAGE_SLOT_BYTES, &d->stage_failed);
}

// The transfer of nbytes from host memory `from` to device memory `to` through
// the next slot: false (nothing queued) when there is none, so the caller takes
// the synchronous path. The slot is held from the wait for its previous
// transfer to its new event (stage_mu: no other upload can take it between).
static bool staged_transfer(cuda_dev *d, void *to, const void *from, size_t nbytes, cudaError_t *e) {
    *e = cudaSuccess;
    if (nbytes > STAGE_SLOT_BYTES) return false;
    std::lock_guard<std::mutex> g(d->stage_mu);
    if (!stage_ready(d)) return false;
    const int i = d->stage_next;
    if (cudaEventSynchronize(d->stage_done[i]) != cudaSuccess) {   // (never recorded: at once)
        (void)cudaGetLastError();
        return false;
    }
    unsigned char *slot = d->stage + (size_t)i * STAGE_SLOT_BYTES;
    memcpy(slot, from, nbytes);
    *e = cudaMemcpyAsync(to, slot, nbytes, cudaMemcpyHostToDevice, d->stream);
    // without its event the slot could be reused under a running transfer: wait for it instead
    if (*e == cudaSuccess && cudaEventRecord(d->stage_done[i], d->stream) != cudaSuccess)
        *e = cudaStreamSynchronize(d->stream);
    d->stage_next = (i + 1) % STAGE_SLOTS;
    if (*e == cudaSuccess) d->n_staged++;
    return true;
}

static moe_status copy_h2d(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src, int64_t n) {
    CUDA_ENTER(d, ctx, dst->device);
    CUDA_NOT_IN_CAPTURE(d, "a copy host->device");
    moe_tensor *hs = moe_tensor_contiguous_cpu((moe_tensor *)src);
    if (!hs) return moe_last_status();
    size_t sbytes = (size_t)n * moe_dtype_size(src->dtype);
    cuda_layout dl = cuda_layout_tensor(dst);
    const bool direct = dst->dtype == src->dtype && cuda_layout_is_flat(dl);
    moe_status st = MOE_OK;
    cuda_scratch tmp(d, direct ? 0 : sbytes);
    if (!direct && !tmp.p) {
        moe_tensor_release(hs);
        return moe_last_status();
    }
    void *to = direct ? moe_tensor_data(dst) : tmp.p;
    cudaError_t e;
    // a staged transfer only has to finish before its slot is reused; from the
    // caller's memory it must finish before that memory goes back
    const bool staged = staged_transfer(d, to, moe_tensor_data(hs), sbytes, &e);
    if (!staged) e = cudaMemcpyAsync(to, moe_tensor_data(hs), sbytes, cudaMemcpyHostToDevice, d->stream);
    if (e == cudaSuccess && !direct)
        st = convert_on_device(d, moe_tensor_data(dst), dst->dtype, dl, tmp.p, src->dtype, cuda_layout_flat(n), n);
    if (e == cudaSuccess && !staged) e = cudaStreamSynchronize(d->stream);
    if (e != cudaSuccess) st = moe_error(MOE_ERR_DEVICE, "cuda copy host->device: %s", cudaGetErrorString(e));
    moe_tensor_release(hs);
    return st;
}

static moe_status copy_d2h(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src, int64_t n) {
    CUDA_ENTER(d, ctx, src->device);
    CUDA_NOT_IN_CAPTURE(d, "a copy device->host");
    size_t dbytes = (size_t)n * moe_dtype_size(dst->dtype);
    cuda_layout sl = cuda_layout_tensor(src);
    // a contiguous device copy in dst's dtype
    const void *dev_src = moe_tensor_data(src);
    cuda_scratch tmp(d, (dst->dtype == src->dtype && cuda_layout_is_flat(sl)) ? 0 : dbytes);
    if (tmp.n) {
        if (!tmp.p) return moe_last_status();
        MOE_TRY(convert_on_device(d, tmp.p, dst->dtype, cuda_layout_flat(n), dev_src, src->dtype, sl, n));
        dev_src = tmp.p;
    }
    moe_tensor *hd = dst;
    if (!moe_tensor_is_contiguous(dst)) {
        hd = moe_tensor_new_cpu(dst->dtype, dst->ndim, dst->shape);
        if (!hd) return moe_last_status();
    }
    moe_status st = MOE_OK;
    cudaError_t e = cudaMemcpyAsync(moe_tensor_data(hd), dev_src, dbytes, cudaMemcpyDeviceToHost, d->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(d->stream);
    if (e != cudaSuccess) st = moe_error(MOE_ERR_DEVICE, "cuda copy device->host: %s", cudaGetErrorString(e));
    if (hd != dst) {
        if (st == MOE_OK) st = moe_tensor_copy_cpu(dst, hd);
        moe_tensor_release(hd);
    }
    return st;
}

// ---- reads of one-element tensors (moe_op_read_start / finish) ----
// Each read takes one slot of READ_SLOTS (MOE_READ_MAX values of 8 bytes): its
// copies land there and the slot's event follows them on the stream, so the
// finish waits for the copies, not for what was queued after them. Slots go
// round; a slot still in flight is waited for before reuse, and its generation
// moves on, so a read finished after its slot was taken reports it.
constexpr int READ_SLOTS = 64;
static_assert(sizeof(((cuda_dev *)nullptr)->read_done) / sizeof(cudaEvent_t) == READ_SLOTS, "one event a slot");

static bool reads_ready(cuda_dev *d) {
    return pinned_slots(&d->reads, d->read_done, READ_SLOTS, (size_t)READ_SLOTS * MOE_READ_MAX * 8, &d->reads_failed);
}

void cuda_pinned_slots_free(cuda_dev *d) {
    // queued transfers may still read the pinned slots
    if ((d->stage || d->reads) && d->stream) cudaStreamSynchronize(d->stream);
    if (d->stage) {
        for (cudaEvent_t e : d->stage_done) cudaEventDestroy(e);
        cudaFreeHost(d->stage);
        d->stage = nullptr;
    }
    if (d->reads) {
        for (cudaEvent_t e : d->read_done) cudaEventDestroy(e);
        cudaFreeHost(d->reads);
        d->reads = nullptr;
    }
}

moe_status cuda_read_start(moe_ctx *ctx, const moe_tensor *const *ts, int n, moe_read *r) {
    CUDA_ENTER(d, ctx, r->dev);
    CUDA_NOT_IN_CAPTURE(d, "a read of device values");
    std::lock_guard<std::mutex> g(d->stage_mu);   // the slot, from its wait to its new event
    if (!reads_ready(d)) {   // no pinned memory: read now, through a synchronous copy
        for (int i = 0; i < n; i++) {
            unsigned char b[8];
            CU_TRY(cudaMemcpyAsync(b, moe_tensor_data((moe_tensor *)ts[i]), moe_dtype_size(ts[i]->dtype),
                                   cudaMemcpyDeviceToHost, d->stream), "read_start");
            CU_TRY(cudaStreamSynchronize(d->stream), "read_start");
            r->value[i] = moe_dtype_load(ts[i]->dtype, b);
        }
        r->done = 1;
        return MOE_OK;
    }
    const int slot = d->read_next;
    d->read_next = (slot + 1) % READ_SLOTS;
    d->read_gen[slot]++;   // a read still holding this slot now finds it taken
    unsigned char *base = d->reads + (size_t)slot * MOE_READ_MAX * 8;
    CU_TRY(cudaEventSynchronize(d->read_done[slot]), "read_start");   // its previous copies (never recorded: at once)
    for (int i = 0; i < n; i++)
        CU_TRY(cudaMemcpyAsync(base + 8 * i, moe_tensor_data((moe_tensor *)ts[i]), moe_dtype_size(ts[i]->dtype),
                               cudaMemcpyDeviceToHost, d->stream), "read_start");
    CU_TRY(cudaEventRecord(d->read_done[slot], d->stream), "read_start");
    r->slot = slot;
    r->gen = d->read_gen[slot];
    return MOE_OK;
}

static bool read_current(const cuda_dev *d, const moe_read *r) {
    return r->slot >= 0 && r->slot < READ_SLOTS && d->reads && d->read_gen[r->slot] == r->gen;
}

moe_status cuda_read_finish(moe_ctx *ctx, moe_read *r) {
    CUDA_ENTER(d, ctx, r->dev);
    CUDA_NOT_IN_CAPTURE(d, "a read of device values");
    static const char *taken = "read_finish: this read's host memory was taken by later reads (more than %d started "
                               "since without being finished)";
    cudaEvent_t done;
    {
        std::lock_guard<std::mutex> g(d->stage_mu);
        if (!read_current(d, r)) return moe_error(MOE_ERR_STATE, taken, READ_SLOTS);
        done = d->read_done[r->slot];
    }
    // the wait (for everything queued before the read) without the lock: uploads go on meanwhile
    CU_TRY(cudaEventSynchronize(done), "read_finish");
    std::lock_guard<std::mutex> g(d->stage_mu);
    if (!read_current(d, r)) return moe_error(MOE_ERR_STATE, taken, READ_SLOTS);
    const unsigned char *base = d->reads + (size_t)r->slot * MOE_READ_MAX * 8;
    for (int i = 0; i < r->n; i++) r->value[i] = moe_dtype_load(r->dtype[i], base + 8 * i);
    r->done = 1;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_staged_copies(moe_ctx *ctx, int device, uint64_t *copies) {
    return cuda_read_counter(ctx, device, copies, &cuda_dev::n_staged, "moe_cuda_staged_copies");
}

// Between two GPUs: a contiguous copy in dst's dtype on the source GPU, a peer
// copy, then (if dst is strided) a scatter on the destination GPU. Both
// streams are synchronised, so the staging blocks can go back to the caches.
static moe_status copy_peer(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src, int64_t n) {
    size_t dbytes = (size_t)n * moe_dtype_size(dst->dtype);
    CUDA_ENTER(s, ctx, src->device);
    cuda_layout sl = cuda_layout_tensor(src), dl = cuda_layout_tensor(dst);
    CUDA_NOT_IN_CAPTURE(s, "a copy between devices");
    const void *from = moe_tensor_data(src);
    cuda_scratch stmp(s, (dst->dtype == src->dtype && cuda_layout_is_flat(sl)) ? 0 : dbytes);
    if (stmp.n) {
        if (!stmp.p) return moe_last_status();
        MOE_TRY(convert_on_device(s, stmp.p, dst->dtype, cuda_layout_flat(n), from, src->dtype, sl, n));
        from = stmp.p;
    }
    CU_TRY(cudaStreamSynchronize(s->stream), "copy device->device");
    CUDA_ENTER(d, ctx, dst->device);
    bool flat = cuda_layout_is_flat(dl);
    cuda_scratch dtmp(d, flat ? 0 : dbytes);
    if (!flat && !dtmp.p) return moe_last_status();
    void *to = flat ? moe_tensor_data(dst) : dtmp.p;
    CU_TRY(cudaMemcpyPeerAsync(to, d->index, from, s->index, dbytes, d->stream), "copy device->device (peer)");
    if (!flat)
        MOE_TRY(convert_on_device(d, moe_tensor_data(dst), dst->dtype, dl, dtmp.p, dst->dtype, cuda_layout_flat(n), n));
    CU_TRY(cudaStreamSynchronize(d->stream), "copy device->device");
    return MOE_OK;
}

moe_status cuda_copy(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src) {
    int64_t n = moe_tensor_numel(dst);
    if (n == 0) return MOE_OK;
    bool sc = src->device.type == MOE_CUDA, dc = dst->device.type == MOE_CUDA;
    if (dc && !sc) return copy_h2d(ctx, dst, src, n);
    if (sc && !dc) return copy_d2h(ctx, dst, src, n);
    if (!sc && !dc) return moe_tensor_copy_cpu(dst, src);
    if (src->device.index != dst->device.index) return copy_peer(ctx, dst, src, n);
    CUDA_ENTER(d, ctx, dst->device);
    return convert_on_device(d, moe_tensor_data(dst), dst->dtype, cuda_layout_tensor(dst), moe_tensor_data(src),
                             src->dtype, cuda_layout_tensor(src), n);
}

// ---- fill ----
template <typename E>
__global__ void k_fill(E *dst, cuda_layout l, E v, int64_t n) {
    GRID_STRIDE(i, n) dst[cuda_offset(l, i)] = v;
}

moe_status cuda_fill(moe_ctx *ctx, moe_tensor *t, double v) {
    int64_t n = moe_tensor_numel(t);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, t->device);
    uint64_t pattern = 0;
    moe_dtype_store(t->dtype, &pattern, v);   // the CPU's conversion, bit for bit
    size_t es = moe_dtype_size(t->dtype);
    cuda_layout l = cuda_layout_tensor(t);
    void *p = moe_tensor_data(t);
    if (pattern == 0 && cuda_layout_is_flat(l)) {
        CU_TRY(cudaMemsetAsync(p, 0, (size_t)n * es, d->stream), "fill");
        return MOE_OK;
    }
    unsigned grid = cuda_grid_1d(d, n, 256);
    switch (es) {
    case 1: k_fill<uint8_t><<<grid, 256, 0, d->stream>>>((uint8_t *)p, l, (uint8_t)pattern, n); break;
    case 2: k_fill<uint16_t><<<grid, 256, 0, d->stream>>>((uint16_t *)p, l, (uint16_t)pattern, n); break;
    case 4: k_fill<uint32_t><<<grid, 256, 0, d->stream>>>((uint32_t *)p, l, (uint32_t)pattern, n); break;
    default: k_fill<uint64_t><<<grid, 256, 0, d->stream>>>((uint64_t *)p, l, pattern, n); break;
    }
    CU_LAUNCHED("fill");
    return MOE_OK;
}
