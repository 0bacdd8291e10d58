#!/usr/bin/env python3
"""The Hugging Face `tokenizers` side of bench/tokenizer.lua: the same text
(tinyshakespeare, 1.1 MB), the same two tokenizer files and the same splits
(whole: one encode() call on the whole text; lines: one call per line, each
with its "\\n"), single-threaded (TOKENIZERS_PARALLELISM=false, no
encode_batch). "first" is the first pass on a freshly loaded tokenizer, "best"
the best of N passes after it. Prints table rows; bench/tokenizer.lua runs it.

    python3 bench/tokenizer_hf.py [runs]
"""
import os
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import tokenizers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
FILES = [("gpt-neox-20b-pii-special", "tokenizers/gpt-neox-20b-pii-special.json"),
         ("dolma2", "tokenizers/dolma2.json")]


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with open(os.path.join(DATA, "text", "tinyshakespeare.txt"), "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    lines = text.splitlines(keepends=True)
    mb = len(raw) / 1e6

    def run(tk, split):
        t0 = time.perf_counter()
        if split == "whole":
            n = len(tk.encode(text, add_special_tokens=False).ids)
        else:
            n = sum(len(tk.encode(line, add_special_tokens=False).ids) for line in lines)
        return time.perf_counter() - t0, n

    for split in ("whole", "lines"):
        for name, rel in FILES:
            t0 = time.perf_counter()
            tk = Tokenizer.from_file(os.path.join(DATA, rel))
            load = time.perf_counter() - t0
            first, n = run(tk, split)
            best = min(run(tk, split)[0] for _ in range(runs))
            print(f"| HF tokenizers {tokenizers.__version__} | {name} | {split} | {n} | {load * 1e3:.0f} | "
                  f"{mb / first:.2f} | {mb / best:.2f} |", flush=True)


if __name__ == "__main__":
    main()
