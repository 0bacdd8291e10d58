#!/usr/bin/env python3
"""Where the GPU sits idle in a training step, from bench/cupti_trace.c's CSV.

Steps are cut at the optimizer: a step's window runs from the end of one run
of AdamW kernels to the end of the next. In each window the GPU's busy time
(kernels, copies, memsets; one stream) and its idle gaps; a gap is
  host  - the call that queued the next activity began after the GPU went idle
          (the GPU waited for the host, e.g. after a sync);
  queue - the next activity was already queued: the cost of a boundary
          between dependent kernels on one stream.
Prints per-step totals (median over the last `steps` windows), the gaps by
kind, and the largest gaps of the median step with their neighbours.

  python3 bench/trace_gaps.py cupti_trace.csv [steps=10] [cut=adamw]

cut: the kernel name (a substring) whose runs end the windows: "adamw" for a
training step; for bench/gpu_moe_layer_kernels.lua, "k_assign" (the routing's
top-k, once a layer forward) gives one forward+backward a window, with the
host's work between iterations in the largest gap.
"""
import bisect
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict


def demangle(names):
    names = sorted(set(names))
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    short = {}
    for n, d in zip(names, out):
        d = d.replace("(anonymous namespace)::", "")
        if d.startswith("void "):
            d = d[5:]
        d = d.split("(")[0].split("<")[0]
        short[n] = d.split("::")[-1] or n
    return short


def main():
    path = sys.argv[1]
    nsteps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    cut = sys.argv[3] if len(sys.argv) > 3 else "adamw"
    gpu, api = [], {}
    api_list = []
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split(",", 4)
            if len(p) < 4:
                continue
            kind, s, e, corr = p[0], int(p[1]), int(p[2]), int(p[3])
            rest = p[4] if len(p) > 4 else ""
            if kind == "R":
                api[corr] = (s, e, rest)
                api_list.append((s, e, rest))
            elif kind == "K":
                gpu.append((s, e, corr, rest))
            elif kind == "M":
                gpu.append((s, e, corr, "[memcpy %s B kind %s]" % tuple(rest.split(","))))
            elif kind == "S":
                gpu.append((s, e, corr, "[memset %s B]" % rest))
    gpu.sort()
    api_list.sort()
    api_starts = [a[0] for a in api_list]
    short = demangle([g[3] for g in gpu if not g[3].startswith("[")])
    name = lambda g: short.get(g[3], g[3])
    # step ends: the last kernel of each run of `cut` kernels (AdamW's by default)
    ends, in_run = [], False
    for i, g in enumerate(gpu):
        is_adam = cut in name(g)
        if in_run and not is_adam:
            ends.append(i - 1)
        in_run = is_adam
    if in_run:
        ends.append(len(gpu) - 1)
    if len(ends) < 2:
        sys.exit("trace_gaps: fewer than two runs of %s kernels in the trace" % cut)
    windows = list(zip(ends[:-1], ends[1:]))[-nsteps:]
    rows = []
    for a, b in windows:
        t0, t1 = gpu[a][1], gpu[b][1]
        busy, end = 0, t0
        gaps = []
        launches = 0
        prev = gpu[a]
        for g in gpu[a + 1:b + 1]:
            launches += 1
            s, e = g[0], g[1]
            if s > end:
                q = api.get(g[2])
                host_late = q is not None and q[1] > end
                # the host call running when the GPU went idle (a sync shows here)
                j = bisect.bisect_right(api_starts, end) - 1
                during = api_list[j][2] if j >= 0 and api_list[j][1] >= end else "-"
                gaps.append((s - end, "host" if host_late else "queue", prev, g, during))
            busy += max(0, e - max(s, end))
            end = max(end, e)
            prev = g
        rows.append({"wall": t1 - t0, "busy": busy, "gaps": gaps, "launches": launches})
    med = sorted(rows, key=lambda r: r["wall"])[len(rows) // 2]
    us = lambda ns: ns / 1e3
    print("# %d windows (%s runs to %s runs), GPU activities %d a window (median window)" % (len(rows), cut, cut, med["launches"]))
    print("%-26s %10s %10s %10s" % ("", "min", "median", "max"))
    for key, f in (("wall ms", lambda r: r["wall"]), ("busy ms", lambda r: r["busy"]),
                   ("idle ms", lambda r: r["wall"] - r["busy"]),
                   ("idle: queued boundaries ms", lambda r: sum(x[0] for x in r["gaps"] if x[1] == "queue")),
                   ("idle: waiting for host ms", lambda r: sum(x[0] for x in r["gaps"] if x[1] == "host"))):
        v = sorted(f(r) / 1e6 for r in rows)
        print("%-26s %10.3f %10.3f %10.3f" % (key, v[0], statistics.median(v), v[-1]))
    q = [x[0] for x in med["gaps"] if x[1] == "queue"]
    if q:
        print("# median step: %d queued boundaries with a gap, mean %.2f us, median %.2f us" %
              (len(q), us(sum(q) / len(q)), us(statistics.median(q))))
    # host-side gaps grouped by what the host was doing when the GPU went idle
    by = defaultdict(lambda: [0, 0])
    for x in med["gaps"]:
        if x[1] == "host":
            by[x[4]][0] += 1
            by[x[4]][1] += x[0]
    print("# median step: GPU waiting for the host, by the host call running when it went idle")
    for k, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print("  %-40s %4d gaps %9.1f us" % (k, n, us(t)))
    # queued boundaries by the pair of kernels around them
    pairs = defaultdict(lambda: [0, 0])
    for x in med["gaps"]:
        if x[1] == "queue":
            k = name(x[2]) + " -> " + name(x[3])
            pairs[k][0] += 1
            pairs[k][1] += x[0]
    print("# median step: queued boundaries, the 15 costliest kernel pairs")
    for k, (n, t) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:15]:
        print("  %-80s %4d x %6.2f us = %7.1f us" % (k[:80], n, us(t / n), us(t)))
    print("# median step: the 20 longest gaps")
    for x in sorted(med["gaps"], key=lambda x: -x[0])[:20]:
        print("  %8.1f us %-5s %-34s -> %-34s (host in %s)" % (us(x[0]), x[1], name(x[2])[:34], name(x[3])[:34], x[4]))
    # kernel time of the median step by name
    tot = defaultdict(lambda: [0, 0])
    a, b = windows[rows.index(med)]
    for g in gpu[a + 1:b + 1]:
        tot[name(g)][0] += 1
        tot[name(g)][1] += g[1] - g[0]
    print("# median step: GPU time by activity (top 25)")
    for k, (n, t) in sorted(tot.items(), key=lambda kv: -kv[1][1])[:25]:
        print("  %-60s %4d %9.1f us" % (k[:60], n, us(t)))


if __name__ == "__main__":
    main()
