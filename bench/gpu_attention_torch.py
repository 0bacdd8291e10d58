"""PyTorch's causal attention at the step model's shape, per SDPA backend: the
baseline for moelab's attention kernels (tests/gpu/check_cuda_timing.c,
time_attention_step, prints moelab's figures at the same shape).

    python3 bench/gpu_attention_torch.py [B T H D] [--iters 20]

q, k, v [B, H, T, D] bf16 (the step model: 8, 1024, 16, 64), causal. For each
backend torch offers on this machine (flash, cuDNN, memory-efficient), the
median of `iters` timed runs after 3 warm-up ones, CUDA events around each:
the forward alone, and forward + backward with a random output gradient.
FLOPs as check_cuda_timing counts them: forward 4 B H T^2 D / 2 (causal),
backward 2.5x the forward.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[8, 1024, 16, 64])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    B, T, H, D = args.shape
    torch.manual_seed(0)
    dev = "cuda"
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    fwd_flops = 4.0 * B * H * T * T * D * 0.5
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; q, k, v [{B}, {H}, {T}, {D}] bf16, causal")
    print(f"{'backend':<10} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'bwd TFLOP/s':>12}")
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(be):
                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def fwd_bwd():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    torch.autograd.grad(o, (q, k, v), go)

                f = timed(fwd, args.iters)
                fb = timed(fwd_bwd, args.iters)
        except RuntimeError as e:   # the backend does not take this shape or machine
            print(f"{name:<10} unavailable: {str(e).splitlines()[0][:80]}")
            continue
        b = fb - f
        print(f"{name:<10} {f:8.3f} {fwd_flops / f / 1e9:8.1f} {fb:11.3f} {2.5 * fwd_flops / b / 1e9:12.1f}")


if __name__ == "__main__":
    main()
