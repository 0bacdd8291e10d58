#!/usr/bin/env python3
"""What the GPU's clocks did during a benchmark, from nvidia-smi samples.

A benchmark script samples in the background while it runs:

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv --loop-ms=100 > clocks.csv &

then prints `python3 bench/clock_summary.py clocks.csv`: over the busy
samples (the GPU not idle), the SM clock's range and median and how often
each reason held the clock down. An H200 ran the OLMoE layer at 1680-1710
MHz under its software power cap (700 W) where it idles at 1980, so a figure
without this line cannot tell a slower kernel from a capped card.
"""
import statistics
import sys

# bits of clocks_event_reasons.active (nvidia-smi -q documents the same names)
REASONS = [
    (0x4, "software power cap"),
    (0x8, "hardware slowdown"),
    (0x20, "software thermal slowdown"),
    (0x40, "hardware thermal slowdown"),
    (0x80, "hardware power brake"),
    (0x2, "application clocks setting"),
]
IDLE = 0x1


def number(field):
    """The number at the start of a field such as '1980 MHz' or '121.76 W' (None if not a number)."""
    try:
        return float(field.strip().split()[0])
    except (ValueError, IndexError):
        return None


def read(path):
    """Rows of (clock MHz, power W, temperature C, reasons bits); header and malformed lines skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            p = [x.strip() for x in line.split(",")]
            if len(p) < 5 or p[0].startswith("timestamp"):
                continue
            clock, power, temp = number(p[1]), number(p[2]), number(p[3])
            try:
                bits = int(p[4], 16)
            except ValueError:
                continue
            if clock is not None:
                rows.append((clock, power, temp, bits))
    return rows


def summary(rows):
    busy = [r for r in rows if not r[3] & IDLE]
    if not busy:
        return "clocks: no busy samples (%d samples, all idle or none)" % len(rows)
    clocks = [r[0] for r in busy]
    line = "SM clock while busy (%d samples of %d): min %.0f, median %.0f, max %.0f MHz" % (
        len(busy), len(rows), min(clocks), statistics.median(clocks), max(clocks))
    temps = [r[2] for r in busy if r[2] is not None]
    if temps:
        line += "; temperature up to %.0f C" % max(temps)
    held = ["%s %.0f%%" % (name, 100.0 * sum(1 for r in busy if r[3] & bit) / len(busy))
            for bit, name in REASONS if any(r[3] & bit for r in busy)]
    line += "; held down by: " + (", ".join(held) if held else "nothing")
    return line


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: clock_summary.py clocks.csv")
    try:
        rows = read(sys.argv[1])
    except OSError as e:
        sys.exit("clock_summary: %s" % e)
    print(summary(rows))


if __name__ == "__main__":
    main()
