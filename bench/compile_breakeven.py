"""What `--compile` costs and when it pays: the default model (or --model), one process, a first
generation with torch.compile (compiling included), then --runs more, next to the same without it.

    python bench/compile_breakeven.py [--model PATH] [--runs 3] [--steps 25]

break-even images = compile overhead / time saved per image (none if compiling saves nothing)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm import Pipeline


def timed(pipe, steps: int) -> float:
    t0 = time.perf_counter()
    pipe("a red circle on the left", seed=0, steps=steps)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=25)
    a = p.parse_args()
    plain = Pipeline.from_pretrained(a.model)
    fast = Pipeline.from_pretrained(a.model).compile()
    first_plain, first_fast = timed(plain, a.steps), timed(fast, a.steps)
    runs_plain, runs_fast = [], []
    for _ in range(a.runs):                     # alternate: drift in load hits both alike
        runs_plain.append(timed(plain, a.steps))
        runs_fast.append(timed(fast, a.steps))
    mp, mf = statistics.median(runs_plain), statistics.median(runs_fast)
    overhead = first_fast - first_plain
    saved = mp - mf
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} steps")
    print("| | plain (s) | compiled (s) |\n|---|---|---|")
    print(f"| first image (compiled: with compiling) | {first_plain:.2f} | {first_fast:.2f} |")
    print(f"| later images, median of {a.runs} | {mp:.2f} | {mf:.2f} |")
    print(f"compile overhead {overhead:.1f} s; saves {saved:.2f} s an image; break-even: "
          + (f"{overhead / saved:.0f} images" if saved > 0 else "never (compiling saves nothing here)"))


if __name__ == "__main__":
    main()
