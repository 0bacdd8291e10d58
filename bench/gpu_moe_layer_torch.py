"""PyTorch baselines for bench/gpu_moe_layer.lua: MoE layer forward+backward
throughput at the OLMoE and Mixtral layer shapes, on one CUDA device.

    python3 bench/gpu_moe_layer_torch.py [olmoe|mixtral]
    python3 bench/gpu_moe_layer_torch.py --check [olmoe|mixtral]

--check times nothing: it copies the weights of transformers' block into the
torch._grouped_mm layer and compares both bf16 layers (output, input gradient,
weight gradients) against transformers' eager block run in f32 on the same
weights, by ||a - ref|| / ||ref||.

Rows, per shape (every one timed with torch.cuda.Event, 3 warm-up and 10
timed iterations, median):
  transformers  OlmoeSparseMoeBlock / MixtralSparseMoeBlock (as the installed
                transformers provides them, configured through
                OlmoeConfig / MixtralConfig), bf16 and f32, with the "eager"
                experts implementation (the loop over experts), and in bf16
                also with transformers' "grouped_mm" one where it has one
  torch grouped the same layer written here on torch._grouped_mm (bf16), if
                torch has it: softmax router, top-k, sort by expert, one
                grouped GEMM for gate+up, SwiGLU, one for down, weighted
                index_add
  dense GEMM    one matrix product of the same FLOPs as the expert GEMMs
                (forward: [T*k, d] @ [d, 3*d_e]; forward+backward: N = 9*d_e),
                bf16 and f32 (no TF32), and f32 with TF32 as a note
f32 runs with TF32 off (torch's default, set explicitly), as moelab's cuBLAS
f32 path does. Forward is timed with autograd recording (a training forward);
forward+backward adds y.backward(dy) with a random dy, and the input needs a
gradient too. Lines starting with "ROW|" are what bench/gpu_moe_layer.sh reads.
"""
import math
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

WARMUP, ITERS = 3, 10
SHAPES = [
    dict(name="OLMoE", T=16384, d=2048, de=1024, E=64, k=8, renorm=False),
    dict(name="Mixtral", T=8192, d=4096, de=14336, E=8, k=2, renorm=True),
]
OUT = os.environ.get("OUT")
dev = torch.device("cuda")


def log(*a):
    print(*a, flush=True)


def row(shape, impl, dtype, fwd_ms, fb_ms, fwd_flops, fb_flops, note=""):
    def f(ms, fl):
        if ms is None:
            return "", ""
        return f"{ms:.2f}", (f"{fl / (ms * 1e-3) / 1e12:.1f}" if fl else "")

    a, b = f(fwd_ms, fwd_flops)
    c, d = f(fb_ms, fb_flops)
    line = "|".join(["ROW", shape, impl, dtype, a, b, c, d, note])
    log(line)
    if OUT:
        with open(os.path.join(OUT, "torch_rows.txt"), "a") as fh:
            fh.write(line + "\n")


def time_ms(fn, before=None):
    """Median ms of fn() over ITERS runs after WARMUP (CUDA events); before()
    runs outside the timed region."""
    for _ in range(WARMUP):
        if before:
            before()
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(ITERS):
        if before:
            before()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts), min(ts), max(ts)


def init_uniform_(params):
    # as nn.Linear (and moelab): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the last dim
    with torch.no_grad():
        for p in params:
            b = 1.0 / math.sqrt(p.shape[-1])
            p.uniform_(-b, b)


def time_layer(forward, params, x, dy):
    """(fwd ms, fwd+bwd ms) of y = forward(x) with autograd, then y.backward(dy)."""

    def clear():
        for p in params:
            p.grad = None
        x.grad = None

    def fwd():
        forward(x)

    def fb():
        forward(x).backward(dy)

    f = time_ms(fwd, clear)
    b = time_ms(fb, clear)
    return f, b


# ---------------------------------------------------------------- transformers
def hf_block(s, dtype, impl):
    import transformers

    if s["name"] == "OLMoE":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        cfg = OlmoeConfig(hidden_size=s["d"], intermediate_size=s["de"], num_experts=s["E"],
                          num_experts_per_tok=s["k"], norm_topk_prob=False)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=s["d"], intermediate_size=s["de"], num_local_experts=s["E"],
                            num_experts_per_tok=s["k"], router_jitter_noise=0.0)
    has_impl = hasattr(cfg, "_experts_implementation")
    if impl != "eager" and not has_impl:
        raise RuntimeError(f"transformers {transformers.__version__} has no experts implementations")
    if has_impl:
        cfg._experts_implementation = impl
    with torch.device(dev):
        blk = Block(cfg)
    blk = blk.to(dtype)
    blk.train()
    init_uniform_(list(blk.parameters()))
    used = getattr(cfg, "_experts_implementation", None) if has_impl else "eager (v4 loop)"
    return blk, used


def run_hf(s, dtype, dname, impl, fwd_flops, fb_flops, x, dy):
    import transformers

    blk, used = hf_block(s, dtype, impl)
    cls = type(blk).__name__
    log(f"   {cls} transformers {transformers.__version__}, experts implementation {used}, {dname}")

    def forward(inp):
        out = blk(inp)
        return out[0] if isinstance(out, tuple) else out

    (f, flo, fhi), (b, blo, bhi) = time_layer(forward, list(blk.parameters()), x, dy)
    log(f"   fwd {f:.2f} ms (min {flo:.2f}, max {fhi:.2f}); fwd+bwd {b:.2f} ms (min {blo:.2f}, max {bhi:.2f})")
    row(s["name"], f"transformers {cls} ({used})", dname, f, b, fwd_flops, fb_flops)
    del blk


# ---------------------------------------------------------------- torch._grouped_mm
class GroupedMoE(torch.nn.Module):
    """Softmax top-k router and SwiGLU experts, the expert GEMMs as
    torch._grouped_mm over rows sorted by expert."""

    def __init__(self, d, de, E, k, renorm):
        super().__init__()
        self.E, self.k, self.renorm = E, k, renorm
        self.router = torch.nn.Parameter(torch.empty(E, d))
        self.w_gate_up = torch.nn.Parameter(torch.empty(E, 2 * de, d))   # [out, in] per expert
        self.w_down = torch.nn.Parameter(torch.empty(E, d, de))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        w, idx = torch.topk(probs, self.k, dim=-1)
        if self.renorm:
            w = w / w.sum(dim=-1, keepdim=True)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // self.k
        counts = torch.bincount(flat, minlength=self.E)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x[tok]
        gu = torch._grouped_mm(xs, self.w_gate_up.transpose(-2, -1), offs=offs)
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g) * u
        ys = torch._grouped_mm(h, self.w_down.transpose(-2, -1), offs=offs)
        ys = ys * w.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        y = torch.zeros((n, shape[-1]), dtype=x.dtype, device=x.device).index_add(0, tok, ys)
        return y.reshape(shape)


def run_grouped(s, fwd_flops, fb_flops, x, dy):
    with torch.device(dev):
        m = GroupedMoE(s["d"], s["de"], s["E"], s["k"], s["renorm"])
    m = m.to(torch.bfloat16)
    init_uniform_(list(m.parameters()))
    (f, flo, fhi), (b, blo, bhi) = time_layer(m, list(m.parameters()), x, dy)
    log(f"   torch._grouped_mm layer: fwd {f:.2f} ms (min {flo:.2f}, max {fhi:.2f}); "
        f"fwd+bwd {b:.2f} ms (min {blo:.2f}, max {bhi:.2f})")
    row(s["name"], "torch._grouped_mm layer (this script)", "bf16", f, b, fwd_flops, fb_flops)
    del m


# ---------------------------------------------------------------- dense ceiling
def run_dense(s, dtype, dname, fwd_flops, fb_flops, tf32=False):
    M, K = s["T"] * s["k"], s["d"]
    res = {}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for tag, N in (("fwd", 3 * s["de"]), ("fb", 9 * s["de"])):
            a = torch.randn(M, K, device=dev, dtype=dtype)
            b = torch.randn(K, N, device=dev, dtype=dtype)
            ms, lo, hi = time_ms(lambda: a @ b)
            res[tag] = ms
            log(f"   dense {dname}{' tf32' if tf32 else ''} {M}x{K}x{N}: {ms:.2f} ms (min {lo:.2f}, max {hi:.2f})")
            del a, b
            torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    note = "ceiling: one GEMM of the same FLOPs"
    if tf32:
        note += "; TF32 tensor cores (not moelab's f32 mode)"
    row(s["name"], "dense GEMM (torch.matmul)", dname + ("+tf32" if tf32 else ""), res["fwd"], res["fb"],
        fwd_flops, fb_flops, note)


def rel(a, ref):
    a, ref = a.float(), ref.float()
    return ((a - ref).norm() / ref.norm()).item()


def check(s):
    """The grouped layer and transformers' bf16 block against transformers' f32 block, same weights."""
    hf32, used = hf_block(s, torch.float32, "eager")
    params = dict(hf32.named_parameters())
    by_shape = {tuple(p.shape): n for n, p in params.items()}
    E, d, de = s["E"], s["d"], s["de"]
    n_router, n_gu, n_down = by_shape.get((E, d)), by_shape.get((E, 2 * de, d)), by_shape.get((E, d, de))
    if not (n_router and n_gu and n_down):
        raise RuntimeError(f"unexpected parameter layout: {[(n, tuple(p.shape)) for n, p in params.items()]}")
    log(f"   transformers parameters: router {n_router}, gate+up {n_gu}, down {n_down}")
    with torch.device(dev):
        m = GroupedMoE(d, de, E, s["k"], s["renorm"])
    with torch.no_grad():
        m.router.copy_(params[n_router]); m.w_gate_up.copy_(params[n_gu]); m.w_down.copy_(params[n_down])
    m = m.to(torch.bfloat16)
    hf16, _ = hf_block(s, torch.bfloat16, "eager")
    hf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in hf32.state_dict().items()})
    g = torch.Generator(device=dev).manual_seed(5)
    x32 = torch.randn(1, s["T"], d, device=dev, generator=g)
    dy32 = torch.randn(1, s["T"], d, device=dev, generator=g)

    def run(mod, dtype, names):
        x = x32.detach().clone().to(dtype).requires_grad_(True)   # a fresh leaf for every run
        out = mod(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(dy32.to(dtype))
        ps = dict(mod.named_parameters())
        return y.detach(), x.grad, [ps[n].grad for n in names]

    ref = run(hf32, torch.float32, [n_router, n_gu, n_down])
    for label, mod, names in (("transformers eager bf16", hf16, [n_router, n_gu, n_down]),
                              ("torch._grouped_mm bf16", m, ["router", "w_gate_up", "w_down"])):
        y, dx, gw = run(mod, torch.bfloat16, names)
        errs = [rel(y, ref[0]), rel(dx, ref[1])] + [rel(a, b) for a, b in zip(gw, ref[2])]
        ok = all(e == e and e < 3e-2 for e in errs)
        log(f"CHECK|{s['name']}|{label}|y {errs[0]:.2e}|dx {errs[1]:.2e}|d router {errs[2]:.2e}|"
            f"d gate_up {errs[3]:.2e}|d down {errs[4]:.2e}|{'ok' if ok else 'MISMATCH'}")


def guarded(what, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except Exception as e:  # one failed row must not lose the others
        log(f"   {what}: FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(limit=4)
        sys.stdout.flush()
    torch.cuda.empty_cache()


def main():
    argv = sys.argv[1:]
    checking = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    only = argv[0].lower() if argv else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        import transformers
        tv = transformers.__version__
    except Exception as e:
        tv = f"not importable ({e})"
    log(f"torch {torch.__version__}, transformers {tv}, device {torch.cuda.get_device_name(0)}, "
        f"torch._grouped_mm {'present' if hasattr(torch, '_grouped_mm') else 'absent'}")
    for s in SHAPES:
        if only and only != s["name"].lower():
            continue
        T, d, de, E, k = s["T"], s["d"], s["de"], s["E"], s["k"]
        fwd_flops = 3 * 2 * T * k * d * de
        fb_flops = 3 * fwd_flops
        log(f"== {s['name']}: T={T} d={d} d_e={de} E={E} top-{k} renormalize={s['renorm']}")
        if checking:
            guarded("check", check, s)
            continue
        guarded("dense bf16", run_dense, s, torch.bfloat16, "bf16", fwd_flops, fb_flops)
        guarded("dense f32", run_dense, s, torch.float32, "f32", fwd_flops, fb_flops)
        guarded("dense f32 tf32", run_dense, s, torch.float32, "f32", fwd_flops, fb_flops, tf32=True)
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            g = torch.Generator(device=dev).manual_seed(2)
            x = torch.randn(1, T, d, device=dev, dtype=dtype, generator=g).requires_grad_(True)
            dy = torch.randn(1, T, d, device=dev, dtype=dtype, generator=g)
            if dtype == torch.bfloat16:
                if hasattr(torch, "_grouped_mm"):
                    guarded("torch._grouped_mm", run_grouped, s, fwd_flops, fb_flops, x, dy)
                else:
                    log("   torch._grouped_mm absent: skipped")
                guarded("transformers grouped_mm", run_hf, s, dtype, dname, "grouped_mm", fwd_flops, fb_flops, x, dy)
            guarded(f"transformers eager {dname}", run_hf, s, dtype, dname, "eager", fwd_flops, fb_flops, x, dy)
            del x, dy
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
