#!/usr/bin/env python3
"""Sums an ncu --csv --metrics gpu__time_duration.sum log by kernel.

    python3 bench/ncu_kernels.py ncu.csv [steps] [--order order.txt]

Prints one table row per kernel name (calls, total ms per step, share), the
total GPU time per step, and with --order writes every launch in order
(index, microseconds, name) for reading the step's sequence.
"""
import csv
import re
import sys


def short(name):
    # drop template arguments and parameter lists for grouping: the kernel's own name
    n = name
    n = re.sub(r"\(.*$", "", n) if not n.startswith("void ") else re.sub(r"\(.*$", "", n[5:])
    depth, out = 0, []
    for ch in n:
        if ch == "<":
            depth += 1
            if depth == 1:
                out.append("<>")
            continue
        if ch == ">":
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    return "".join(out).replace("(anonymous namespace)::", "")


def main():
    args = sys.argv[1:]
    order = None
    if "--order" in args:
        i = args.index("--order")
        order = args[i + 1]
        del args[i:i + 2]
    path = args[0]
    steps = float(args[1]) if len(args) > 1 else 1.0
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1e3 if unit in ("nsecond", "ns") else v * 1e3 if unit in ("msecond", "ms") else v if unit in ("usecond", "us") else v / 1e3
        rows.append((r["Kernel Name"], us, r.get("Grid Size", ""), r.get("Block Size", "")))
    if not rows:
        sys.exit("no gpu__time_duration.sum rows in %s" % path)
    agg = {}
    for name, us, _, _ in rows:
        k = short(name)
        c, t = agg.get(k, (0, 0.0))
        agg[k] = (c + 1, t + us)
    total = sum(t for _, t in agg.values())
    print("%-70s %7s %10s %6s" % ("kernel", "calls", "ms/step", "share"))
    for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print("%-70s %7.0f %10.3f %5.1f%%" % (k[:70], c / steps, t / steps / 1e3, 100 * t / total))
    print("total GPU time of the kernels: %.3f ms per step, %d launches per step" % (total / steps / 1e3, len(rows) / steps))
    if order:
        with open(order, "w") as f:
            for i, (name, us, grid, block) in enumerate(rows):
                f.write("%5d %9.1f %-60s %s %s\n" % (i, us, short(name)[:60], grid, block))


if __name__ == "__main__":
    main()
