"""PyTorch eager twin of moelab's Mixtral-style MoE, for CPU training throughput.

The architecture follows moelab (src/nn/model.c, attention.c, moe_block.c,
router.c, expert_bank.c): pre-norm decoder, RMSNorm (eps 1e-5), bias-free
q/k/v/o projections with grouped-query heads, rotate-half RoPE (theta 1e6),
causal scaled_dot_product_attention, and an MoE feed-forward: bias-free router
-> softmax -> top-2 -> renormalised weights -> SwiGLU experts run one at a
time on the tokens routed to them (index_select), combined with index_add_.
Loss: cross-entropy + 0.01 * sum over layers of E * sum_i f_i P_i + 0.001 *
sum over layers of mean(logsumexp(router logits)^2). AdamW (lr 2e-3, betas
(0.9, 0.95), weight decay 0.1 on matrices only), gradient clipping at 1.0.

  python bench/torch_moe.py [--config quickstart|mixtral20m] [--steps 30] [--warmup 5]
                            [--threads 2] [--json out.json] [--moelab-json moelab.json]
  python bench/torch_moe.py --check DIR   # DIR from ./moelab bench/cpu_train.lua --dump DIR

--check loads the weights and batch that moelab saved, and compares the
losses and gradients of one forward/backward with moelab's: it shows the two
implementations compute the same model. Timing uses random token batches.
"""
import argparse
import json
import math
import os
import statistics
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {
    "quickstart": dict(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       num_experts=8, experts_per_token=2, expert_intermediate_size=256,
                       batch_size=16, seq_len=128),
    "mixtral20m": dict(vocab_size=256, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2,
                       num_experts=8, experts_per_token=2, expert_intermediate_size=512,
                       batch_size=8, seq_len=256),
}
ROPE_THETA = 1e6
NORM_EPS = 1e-5
AUX_COEF = 0.01
Z_COEF = 0.001


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, t, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if rep > 1:  # grouped-query heads: each kv head serves `rep` query heads (as HF's repeat_kv)
            k = k[:, :, None].expand(b, self.kv_heads, rep, t, d).reshape(b, self.heads, t, d)
            v = v[:, :, None].expand(b, self.kv_heads, rep, t, d).reshape(b, self.heads, t, d)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * d))


class Expert(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, hidden, inner, num_experts, top_k):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inner) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(chosen == e)
            if tok.numel() == 0:
                continue
            y = expert(x.index_select(0, tok)) * weights[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y)
        # balancing losses: f = share of the n*k choices per expert (no gradient), P = mean probability
        with torch.no_grad():
            f = torch.bincount(chosen.reshape(-1), minlength=self.num_experts).to(x.dtype) / (n * self.top_k)
        aux = self.num_experts * (f * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return out.reshape(shape), aux, z


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.input_layernorm = nn.RMSNorm(h, eps=NORM_EPS)
        self.self_attn = Attention(h, c["num_heads"], c["num_kv_heads"])
        self.post_attention_layernorm = nn.RMSNorm(h, eps=NORM_EPS)
        self.mlp = MoE(h, c["expert_intermediate_size"], c["num_experts"], c["experts_per_token"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, aux, z = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux, z


class MoEModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.head_dim = h // c["num_heads"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], h)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_layers"]))
        self.norm = nn.RMSNorm(h, eps=NORM_EPS)
        self.lm_head = nn.Linear(h, c["vocab_size"], bias=False)

    def rope(self, t):
        d = self.head_dim
        inv = ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().float(), ang.sin().float()

    def forward(self, ids, cos=None, sin=None):
        if cos is None:
            cos, sin = self.rope(ids.shape[1])
        x = self.embed_tokens(ids)
        aux = z = 0.0
        for layer in self.layers:
            x, a, zz = layer(x, cos, sin)
            aux, z = aux + a, z + zz
        return self.lm_head(self.norm(x)), aux, z


def losses(model, ids, targets, cos, sin):
    logits, aux, z = model(ids, cos, sin)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return ce, aux, z, ce + AUX_COEF * aux + Z_COEF * z


def make_optimizer(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=2e-3, betas=(0.9, 0.95), eps=1e-8, fused=False)


def read_safetensors(path):
    """Minimal safetensors reader (f32 and i64 only) -> {name: tensor}."""
    dtypes = {"F32": torch.float32, "I64": torch.int64}
    with open(path, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(hlen))
        blob = fh.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(blob[a:b]), dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone()
    return out


def moelab_to_torch(tensors, prefix):
    """{torch name: tensor} from moelab's dump entries `prefix + name`. moelab stacks a
    layer's experts as [E, out, in]; they split into per-expert Linear weights."""
    sd = {}
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if ".mlp.experts." in name:
            head, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                sd[f"{head}.{e}.{proj}.weight"] = t[e]
        else:
            sd[name] = t
    return sd


def check(directory):
    ref = json.load(open(os.path.join(directory, "reference.json")))
    c = dict(CONFIGS[ref["config"]])
    model = MoEModel(c)
    t = read_safetensors(os.path.join(directory, "reference.safetensors"))
    model.load_state_dict(moelab_to_torch(t, "p."), strict=True)
    ids, targets = t["ids"], t["targets"]
    cos, sin = model.rope(ids.shape[1])
    ce, aux, z, total = losses(model, ids, targets, cos, sin)
    total.backward()
    gnorm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    rows = [("loss", ce.item(), ref["loss"]), ("aux_loss", aux.item(), ref["aux_loss"]),
            ("z_loss", z.item(), ref["z_loss"])]
    ok = True
    print(f"check {ref['config']}: moelab's weights and batch in PyTorch")
    for name, got, want in rows:
        rel = abs(got - want) / max(abs(want), 1e-12)
        ok &= rel < 1e-4
        print(f"  {name:10s} torch {got:.6f}  moelab {want:.6f}  rel diff {rel:.1e}")
    # the global gradient norm, summed in f64 on both sides, and as moelab's
    # clip_grad_norm reports it (an f32 sum over the flat gradient buffer)
    mnorm = math.sqrt(sum(float(v.double().pow(2).sum()) for k, v in t.items() if k.startswith("g.")))
    rel = abs(gnorm - mnorm) / mnorm
    ok &= rel < 1e-4
    print(f"  grad_norm  torch {gnorm:.6f}  moelab {mnorm:.6f}  rel diff {rel:.1e}"
          f"  (moelab clip_grad_norm: {ref['grad_norm']:.6f}, {(ref['grad_norm'] - mnorm) / mnorm:+.1e})")
    # per parameter: relative difference of the gradients
    want = moelab_to_torch(t, "g.")
    worst = []
    for name, p in model.named_parameters():
        g, w = p.grad.double(), want[name].double()
        rel = float((g - w).norm() / max(float(w.norm()), 1e-30))
        worst.append((rel, name, float(g.norm()), float(w.norm())))
    worst.sort(reverse=True)
    print("  gradients, largest relative differences (torch vs moelab):")
    for rel, name, gn, wn in worst[:8]:
        print(f"    {name:45s} rel {rel:.1e}  |g| torch {gn:.6f} moelab {wn:.6f}")
    ok &= worst[0][0] < 1e-4
    print("  same model: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="quickstart")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--moelab-json", help="moelab's --json output: compare parameter counts")
    ap.add_argument("--check", metavar="DIR", help="compare one step against moelab's dump")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        return check(a.check)

    c = dict(CONFIGS[a.config])
    torch.manual_seed(0)
    model = MoEModel(c)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model)
    bsz, seq, vocab = c["batch_size"], c["seq_len"], c["vocab_size"]
    cos, sin = model.rope(seq)
    gen = torch.Generator().manual_seed(1)
    rates, first_loss, last_loss = [], None, None
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=gen)
        ids, targets = tokens[:, :-1], tokens[:, 1:]
        opt.zero_grad(set_to_none=True)
        ce, aux, z, total = losses(model, ids, targets, cos, sin)
        loss = ce.item()  # moelab reads the losses back every step too
        aux.item(), z.item()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        if step >= a.warmup:
            rates.append(bsz * seq / dt)

    median, mean = statistics.median(rates), statistics.fmean(rates)
    print(f"torch {a.config}: PyTorch {torch.__version__} eager, {torch.get_num_threads()} threads")
    print(f"params {params} ({params / 1e6:.2f}M)")
    print(f"batch {bsz} x seq {seq} = {bsz * seq} tokens/step, {a.warmup} warmup + {a.steps} timed steps")
    print(f"loss {first_loss:.4f} -> {last_loss:.4f} (random tokens)")
    print(f"tokens/s median {median:.1f} mean {mean:.1f} (min {min(rates):.1f} max {max(rates):.1f})")
    status = 0
    if a.moelab_json:
        theirs = json.load(open(a.moelab_json))["params"]
        same = theirs == params
        print(f"parameter count: moelab {theirs}, PyTorch {params}: {'same' if same else 'DIFFERENT'}")
        status = 0 if same else 1
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(impl="pytorch", torch_version=torch.__version__, config=a.config, params=params,
                           batch_size=bsz, seq_len=seq, threads=torch.get_num_threads(), warmup=a.warmup,
                           steps=a.steps, tokens_per_s_median=median, tokens_per_s_mean=mean,
                           tokens_per_s_min=min(rates), tokens_per_s_max=max(rates)), fh, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
