"""How cost grows: time and peak memory of one guided generation against resolution, batch size and
steps, ldm next to diffusers on the same random weights, in one process, alternating.

    python bench/scaling.py                                   # SD1.5 size: 256..1024², batch 1/2/4, 4 steps
    python bench/scaling.py --sizes 256 512 --batches 1 --steps 4 8      # a smaller grid
    python bench/scaling.py --preset tiny --sizes 64 128 --batches 1 2   # smoke run

Each cell: median wall time of --runs generations (the preset's sampler, DDIM; guidance 7.5; decoded to pixels) and the
peak memory above what the process held before it (CPU: peak RSS, reset through
/proc/self/clear_refs; CUDA: torch's peak allocation), so the weights of both models, loaded once,
are not counted. ldm's 1024² decodes in tiles (ldm/tiling.py); diffusers' as it ships (untiled).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import build, peak_rss_gb, reset_peak_rss  # noqa: E402


def measure(fn, device: torch.device) -> tuple[float, float]:
    """(seconds, peak GB above the current footprint) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
        base = peak_rss_gb()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30
    else:
        peak = peak_rss_gb() - base
    return time.perf_counter() - t0, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, nargs="+", default=[4])
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg, ours, ref = build(args.preset)
    ours.to(device)
    ref.to(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, {device}, fp32")
    print("| size | batch | steps | ldm (s) | diffusers (s) | ldm / diffusers | ldm peak (GB) | diffusers peak (GB) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with torch.inference_mode():                        # warm-up: first calls allocate and page weights in
        ours("a", steps=1, height=min(args.sizes), width=min(args.sizes))
        ref("a", num_inference_steps=1, height=min(args.sizes), width=min(args.sizes))
    for size, batch, steps in itertools.product(args.sizes, args.batches, args.steps):
        def ours_gen():
            ours("a photo of a cat", steps=steps, guidance_scale=7.5, seed=0, height=size, width=size,
                 num_images_per_prompt=batch)

        def ref_gen():
            ref("a photo of a cat", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                num_images_per_prompt=batch, generator=torch.Generator().manual_seed(0))
        times, peaks = {"ldm": [], "diffusers": []}, {"ldm": 0.0, "diffusers": 0.0}
        with torch.inference_mode():
            for _ in range(args.runs):                  # alternate: drift in load hits both alike
                for name, fn in (("ldm", ours_gen), ("diffusers", ref_gen)):
                    seconds, peak = measure(fn, device)
                    times[name].append(seconds)
                    peaks[name] = max(peaks[name], peak)
        a, b = statistics.median(times["ldm"]), statistics.median(times["diffusers"])
        rows.append((size, batch, steps, a, b, peaks["ldm"], peaks["diffusers"]))
        print(f"| {size}² | {batch} | {steps} | {a:.2f} | {b:.2f} | {a / b:.3f} | {peaks['ldm']:.2f} | "
              f"{peaks['diffusers']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
