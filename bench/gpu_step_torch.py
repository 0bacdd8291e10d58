"""PyTorch/transformers baseline for the whole-training-step benchmark
(bench/gpu_step.sh): one training step of an OLMoE-style model on one GPU.

    python3 bench/gpu_step_torch.py --mode all --out $OUT/gpu_step_torch.json
    python3 bench/gpu_step_torch.py --mode grouped_mm --steps 20 --warmup 5
    python3 bench/gpu_step_torch.py --device cpu --layers 1 --seq 64 --batch 2 --steps 2   # smoke test

Model: transformers' OlmoeForCausalLM built from an OlmoeConfig (nothing is
downloaded): vocab 50304, hidden 1024, 8 layers, 16 heads (16 KV heads), 32
experts of hidden 512, top-4 (no renormalisation, OLMoE's default), max
positions 4096, untied lm_head, router aux loss 0.01 with output_router_logits,
attention "sdpa", use_cache False. Parameters and compute in bf16 (model.to
(bfloat16): no f32 master weights), train mode, transformers' own init.

Step: loss = model(input_ids=x, labels=x).loss (causal LM cross-entropy +
0.01 * load-balancing aux loss, as transformers computes it), loss.backward(),
torch.optim.AdamW(fused=True, lr 3e-4, weight_decay 0.1).step(),
zero_grad(set_to_none=True). A fresh batch of random token ids every step
(generated up front on the device from a fixed seed).

Modes (--mode; "all" runs the first three, each in its own subprocess so that
every peak-memory figure starts from an empty allocator):
  grouped_mm  transformers' "grouped_mm" experts implementation (the default
              in transformers 5.x: sort tokens by expert, torch grouped GEMMs)
  compile     grouped_mm, and the model under torch.compile (default mode);
              the optimizer step is not compiled (fused AdamW runs as fused
              multi-tensor kernels already)
  eager_loop  transformers' "eager" experts implementation: the Python loop
              over experts (one pair of GEMMs per expert that got tokens)
How it is selected: transformers 5.x reads config._experts_implementation
(OlmoeConfig(..., experts_implementation=NAME) sets it; the model checks it at
construction, None meaning "grouped_mm") and the experts module, decorated
with @use_experts_implementation, dispatches on it every forward. The script
passes the keyword, then checks model.config._experts_implementation. A
transformers without that switch (4.x) has only the loop: there, grouped_mm
and compile print "unavailable: ..." and eager_loop runs its default block.

Timing: warm-up steps (default 5; compile 10), torch.cuda.synchronize, then
--steps timed steps (default 20) as one perf_counter interval closed by
torch.cuda.synchronize. tokens/s = batch * seq * steps / time; step ms =
time / steps (CUDA events also give a median per-step time, in the JSON).
Peak memory: torch.cuda.empty_cache + reset_peak_memory_stats before the
timed loop, max_memory_allocated / max_memory_reserved after it (printed in
GB = 1e9 bytes; the JSON also has bytes). Parameters, gradients (set to None
after each step, so only live during backward/step) and AdamW state are all
in that peak.

MFU, the usual "6N + attention" model FLOPs (PaLM appendix B convention):
  active params N = every parameter except the input embedding
                    (embed_tokens; the lm_head is counted), with the expert
                    weights scaled by top_k / num_experts (4/32); the router,
                    attention, norms and lm_head count in full. Counted from
                    the built model; analytically, per layer
                    4 d^2 (q,k,v,o) + E d (router) + k * 3 d d_e (experts)
                    + 4 d (RMSNorms incl. q/k norm), plus d + V d at the end.
  attention term  12 * n_layers * seq * d per token: QK^T and AV are
                    2 * seq * d FLOPs each per token and layer forward
                    (4 * seq * d), x3 for forward+backward; the causal mask
                    is NOT halved (the full seq x seq score matrix counts).
  FLOPs/token     = 6 * N + 12 * n_layers * seq * d
  MFU             = FLOPs/token * tokens/s / peak, peak = 989e12 (dense bf16,
                    H100 SXM and H200, by the name torch.cuda.get_device_name
                    gives; PCIe / NVL parts and other devices: --peak-tflops,
                    else MFU n/a).
At the issue's shape N = 135,693,312 and FLOPs/token = 814.16M + 100.66M =
914.82M, so 142.8k tokens/s is 130.6 TFLOP/s, 13.2% MFU (298.4k: 27.6%,
26.8k: 2.5%). Router softmax, aux loss, norms' arithmetic, the loss and the
optimizer are not counted.

Output: a table (mode, tokens/s, step ms, peak allocated GB, peak reserved
GB, MFU), the same as a markdown table between "TABLE BEGIN"/"TABLE END"
lines, and a JSON file (--out, default $OUT/gpu_step_torch.json when $OUT is
set) with the numbers, the torch / transformers versions and the device.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

MODES = ("grouped_mm", "compile", "eager_loop")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}   # dense bf16 tensor-core peak, SXM parts
# per-mode wall-clock caps (s) for --mode all, within --deadline-s overall
MODE_CAP_S = {"grouped_mm": 150, "compile": 300, "eager_loop": 200}


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="all", choices=MODES + ("all",))
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (default 5; 10 for compile)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: 989 on H100/H200, else MFU n/a)")
    p.add_argument("--out", default=None,
                   help="JSON output (default $OUT/gpu_step_torch.json when $OUT is set)")
    p.add_argument("--inprocess", action="store_true",
                   help="with --mode all: run the modes in this process, not in subprocesses")
    p.add_argument("--deadline-s", type=float, default=420,
                   help="with --mode all: overall wall-clock budget for the subprocesses (default 420)")
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)   # child -> parent
    a = p.parse_args(argv)
    if a.steps < 1 or (a.warmup is not None and a.warmup < 0):
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


# ---------------------------------------------------------------- environment
def versions():
    import torch
    try:
        import transformers
        tv = transformers.__version__
    except Exception as e:  # reported, not fatal: every mode then says unavailable
        tv = f"not importable ({type(e).__name__}: {e})"
    return torch.__version__, tv


def device_name(dev):
    import torch
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_flops(args, name):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if "PCIe" in name or "NVL" in name:   # lower-clocked parts: give --peak-tflops
        return None
    for key, v in PEAK_BF16.items():
        if key in name:
            return v
    return None


def model_config(args, experts_impl):
    """The OlmoeConfig of the benchmark; experts_impl None leaves transformers' default."""
    from transformers import OlmoeConfig
    kw = dict(vocab_size=50304, hidden_size=1024, num_hidden_layers=args.layers,
              num_attention_heads=16, num_key_value_heads=16, num_experts=32,
              num_experts_per_tok=4, intermediate_size=512, max_position_embeddings=4096,
              tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True,
              use_cache=False, attn_implementation="sdpa")
    if experts_impl is not None:
        kw["experts_implementation"] = experts_impl
    return OlmoeConfig(**kw)


def experts_switch_available():
    """(True, "") when the installed transformers selects OLMoE's experts
    implementation through config._experts_implementation, else (False, why)."""
    try:
        import transformers
        from transformers import OlmoeConfig
        from transformers.models.olmoe import modeling_olmoe
    except Exception as e:
        return False, f"transformers/OLMoE not importable: {type(e).__name__}: {e}"
    if not hasattr(OlmoeConfig(), "_experts_implementation"):
        return False, (f"transformers {transformers.__version__} has no experts_implementation switch "
                       "(its OLMoE block is the per-expert loop only)")
    if not hasattr(modeling_olmoe, "OlmoeExperts"):
        return False, f"transformers {transformers.__version__}: OLMoE has no OlmoeExperts module to dispatch"
    return True, ""


def grouped_mm_kernel_note(model):
    """Whether transformers will call torch's grouped GEMM or its own fallback for these weights."""
    try:
        from transformers.integrations import moe as tmoe
        import torch
        w = next(p for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj"))
        x = torch.empty(16, w.shape[-1], dtype=w.dtype, device=w.device)
        offs = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        ok = tmoe._can_use_grouped_mm(x, w, offs)
        fn = ("torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm")
              else "torch._grouped_mm")
        return fn if ok else "transformers' grouped_mm fallback (torch's kernel not usable here)"
    except Exception as e:
        return f"unknown ({type(e).__name__})"


# ---------------------------------------------------------------- FLOPs
def count_active(model, cfg):
    """(active params for 6N, total params, embedding params). Expert weights
    (parameters under any module named '*.experts') scaled by top_k / E."""
    expert_ids = set()
    for name, mod in model.named_modules():
        if name.endswith(".experts") or name == "experts":
            expert_ids.update(id(p) for p in mod.parameters())
    frac = cfg.num_experts_per_tok / cfg.num_experts
    active = total = embed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if "embed_tokens" in name:
            embed += n
        elif id(p) in expert_ids:
            active += n * frac
        else:
            active += n
    return int(round(active)), total, embed


def analytic_active(cfg):
    d, de, E, k, L, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                         cfg.num_experts_per_tok, cfg.num_hidden_layers, cfg.vocab_size)
    per_layer = 4 * d * d + E * d + k * 3 * d * de + 4 * d
    return L * per_layer + d + V * d


def flops_per_token(active, cfg, seq):
    return 6 * active + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size


# ---------------------------------------------------------------- one mode
def run_mode(mode, args):
    """Build, warm up and time one mode; returns a result dict (status ok /
    unavailable / failed)."""
    import torch

    res = dict(mode=mode, status="ok")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return dict(mode=mode, status="unavailable", why="CUDA not available")

    ok, why = experts_switch_available()
    if mode in ("grouped_mm", "compile"):
        if not ok:
            return dict(mode=mode, status="unavailable", why=why)
        impl = "grouped_mm"
    else:
        impl = "eager" if ok else None
        if not ok and "not importable" in why:
            return dict(mode=mode, status="unavailable", why=why)
    if mode == "compile" and not hasattr(torch, "compile"):
        return dict(mode=mode, status="unavailable", why=f"torch {torch.__version__} has no torch.compile")

    warmup = args.warmup if args.warmup is not None else (10 if mode == "compile" else 5)
    steps, B, T = args.steps, args.batch, args.seq
    res.update(warmup=warmup, steps=steps, batch=B, seq=T, layers=args.layers)

    from transformers import OlmoeForCausalLM

    torch.manual_seed(args.seed)
    cfg = model_config(args, impl)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = OlmoeForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    model.train()
    build_s = time.perf_counter() - t0

    got_attn = getattr(model.config, "_attn_implementation", None)
    got_impl = getattr(model.config, "_experts_implementation", None) if ok else "eager (no switch)"
    if impl is not None and got_impl != impl:
        return dict(mode=mode, status="unavailable",
                    why=f"asked for experts_implementation={impl!r}, the model has {got_impl!r}")
    if got_attn != "sdpa":
        log(f"   note: attention implementation is {got_attn!r}, not 'sdpa'")
    res.update(experts_implementation=got_impl, attn_implementation=got_attn)
    if impl == "grouped_mm":
        res["grouped_mm_kernel"] = grouped_mm_kernel_note(model)

    active, total, embed = count_active(model, cfg)
    fpt = flops_per_token(active, cfg, T)
    res.update(active_params=active, active_params_analytic=analytic_active(cfg), total_params=total,
               embedding_params=embed, flops_per_token=fpt)
    # the init is transformers' own (_init_weights via post_init): make sure the
    # torch.empty expert weights were really filled
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return dict(mode=mode, status="failed", why=f"non-finite parameters after init: {bad[:3]}")

    fused = True
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, ValueError) as e:
        if dev.type == "cuda":
            raise
        fused = False
        log(f"   note: fused AdamW unavailable on {dev.type} ({e}); using the default AdamW")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    res["adamw_fused"] = fused

    fwd = torch.compile(model) if mode == "compile" else model

    g = torch.Generator(device=dev).manual_seed(args.seed)
    # one separate tensor per step (not views of one block: same strides and offset for torch.compile)
    batches = [torch.randint(0, cfg.vocab_size, (B, T), device=dev, generator=g) for _ in range(warmup + steps)]

    def step(x):
        loss = fwd(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    losses = []
    t0 = time.perf_counter()
    for i in range(warmup):
        losses.append(step(batches[i]))
        if i == 0:
            sync()
            res["first_step_s"] = round(time.perf_counter() - t0, 3)
    sync()
    res["warmup_s"] = round(time.perf_counter() - t0, 3)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        if cuda:
            ev[i].record()
        losses.append(step(batches[warmup + i]))
    if cuda:
        ev[steps].record()
    sync()
    dt = time.perf_counter() - t0

    tok_s = B * T * steps / dt
    res.update(time_s=dt, tokens_per_s=tok_s, step_ms=dt / steps * 1e3, build_s=round(build_s, 3))
    if cuda:
        per = sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(steps))
        res.update(step_ms_median_events=per[len(per) // 2], step_ms_min_events=per[0],
                   step_ms_max_events=per[-1])
        res.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(dev),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(dev))
        res["peak_allocated_gb"] = res["peak_allocated_bytes"] / 1e9
        res["peak_reserved_gb"] = res["peak_reserved_bytes"] / 1e9
    lv = [float(l) for l in losses]
    res.update(loss_first=lv[0], loss_last=lv[-1])
    if not all(math.isfinite(v) for v in lv):
        res["status"] = "failed"
        res["why"] = "non-finite loss"
    name = device_name(dev)
    pk = peak_flops(args, name)
    res["achieved_tflops"] = fpt * tok_s / 1e12
    res["mfu"] = fpt * tok_s / pk if pk else None
    return res


def run_mode_guarded(mode, args):
    try:
        return run_mode(mode, args)
    except Exception as e:  # one failed mode must not lose the others
        traceback.print_exc(limit=6)
        sys.stdout.flush()
        why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return dict(mode=mode, status="failed", why=why)


# ---------------------------------------------------------------- driver
def run_child(mode, args, timeout):
    """Run one mode in a fresh interpreter (own process group, killed whole on timeout)."""
    fd, rf = tempfile.mkstemp(prefix=f"gpu_step_{mode}.", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--result-file", rf,
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--layers", str(args.layers), "--device", args.device, "--seed", str(args.seed)]
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.unlink(rf)
        return dict(mode=mode, status="failed", why=f"timed out after {timeout:.0f} s")
    try:
        with open(rf) as fh:
            res = json.load(fh)
    except Exception:
        res = dict(mode=mode, status="failed",
                   why=f"subprocess exited {rc} after {time.perf_counter() - t0:.0f} s without a result")
    finally:
        os.unlink(rf)
    return res


def fmt(v, spec, none="n/a"):
    return none if v is None else format(v, spec)


def table(results):
    """(aligned text table, markdown table) of the results."""
    hdr = ["mode", "tokens/s", "step ms", "peak alloc GB", "peak reserved GB", "MFU"]
    rows, notes = [], []
    for r in results:
        if r.get("status") == "ok":
            mfu = r.get("mfu")
            rows.append([r["mode"], f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}",
                         fmt(r.get("peak_allocated_gb"), ".2f"), fmt(r.get("peak_reserved_gb"), ".2f"),
                         "n/a" if mfu is None else f"{100 * mfu:.1f}%"])
        else:
            rows.append([r["mode"]] + ["-"] * 5)
            notes.append(f"{r['mode']}: {r.get('status')}: {r.get('why', '')}")
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(hdr)]
    line = lambda cs: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(cs))
    text = "\n".join([line(hdr)] + [line(r) for r in rows] + notes)
    md = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return text, "\n".join(md + ([""] + notes if notes else []))


def main():
    args = parse_args()
    import torch

    if args.result_file:   # child of --mode all: one mode, result to the parent
        res = run_mode_guarded(args.mode, args)
        with open(args.result_file, "w") as fh:
            json.dump(res, fh)
        return

    tv, trv = versions()
    dev = torch.device(args.device)
    name = device_name(dev) if (dev.type != "cuda" or torch.cuda.is_available()) else "no CUDA device"
    pk = peak_flops(args, name)
    ok, why = experts_switch_available()
    log(f"torch {tv}, transformers {trv}, device {name}, "
        f"peak {'n/a' if pk is None else f'{pk / 1e12:.0f} TFLOP/s'} (dense bf16, for MFU)")
    log(f"experts implementation switch: "
        f"{'config._experts_implementation (experts_implementation=...)' if ok else 'none: ' + why}")
    log(f"model: OLMoE-style, {args.layers} layers, d 1024, 16 heads, 32 experts x 512, top-4, "
        f"vocab 50304; batch {args.batch} x seq {args.seq}, {args.steps} timed steps, bf16, sdpa, fused AdamW")

    modes = MODES if args.mode == "all" else (args.mode,)
    results = []
    t_start = time.perf_counter()
    for m in modes:
        log(f"== {m}")
        if args.mode == "all" and not args.inprocess:
            left = args.deadline_s - (time.perf_counter() - t_start)
            if left < 20:
                r = dict(mode=m, status="failed", why=f"skipped: --deadline-s {args.deadline_s:.0f} spent")
            else:
                r = run_child(m, args, min(MODE_CAP_S[m], left))
        else:
            r = run_mode_guarded(m, args)
            if dev.type == "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append(r)
        if r.get("status") == "ok":
            log(f"   experts implementation {r.get('experts_implementation')}"
                + (f" ({r['grouped_mm_kernel']})" if r.get("grouped_mm_kernel") else "")
                + f", attention {r.get('attn_implementation')}, fused AdamW {r.get('adamw_fused')}")
            log(f"   {r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step over {r['steps']} steps "
                f"after {r['warmup']} warm-up ({r['warmup_s']:.1f} s, first step {r.get('first_step_s', 0):.1f} s); "
                f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
            log(f"   active params {r['active_params']:,} (analytic {r['active_params_analytic']:,}), "
                f"total {r['total_params']:,}; {r['flops_per_token'] / 1e9:.4f} GFLOP/token, "
                f"{r['achieved_tflops']:.1f} TFLOP/s")
        elif r.get("status") == "unavailable":
            log(f"   unavailable: {r.get('why')}")
        else:
            log(f"   FAILED: {r.get('why')}")

    text, md = table(results)
    head = (f"{name}; torch {tv}, transformers {trv}; batch {args.batch} x seq {args.seq}, {args.layers} layers, "
            f"{args.steps} timed steps; GB = 1e9 bytes; MFU = (6 N_active + 12 L T d) * tokens/s / "
            f"{'n/a' if pk is None else f'{pk / 1e12:.0f}e12'}")
    log("")
    log(head)
    log(text)
    log("TABLE BEGIN")
    log(head + "\n")
    log(md)
    log("TABLE END")

    out = args.out or (os.path.join(os.environ["OUT"], "gpu_step_torch.json") if os.environ.get("OUT") else None)
    if out:
        doc = dict(benchmark="whole training step, OLMoE-style", torch=tv, transformers=trv, device=name,
                   peak_flops=pk, mfu_formula="(6 * active_params + 12 * layers * seq * d) * tokens_per_s / peak; "
                   "active excludes embed_tokens, counts lm_head, experts at top_k/num_experts; causal not halved",
                   args={k: v for k, v in vars(args).items() if k != "result_file"}, results=results)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(doc, fh, indent=1)
        log(f"wrote {out}")
    else:
        log("no JSON written (no --out and $OUT unset)")


if __name__ == "__main__":
    main()
