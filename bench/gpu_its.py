"""Sampling speed in it/s, ldm next to diffusers with the same settings, on a GPU (or a CPU smoke run).

    python bench/gpu_its.py                                  # CUDA, SD1.5 size, 512², fp16, 50 steps
    python bench/gpu_its.py --compile                        # + torch.compile(max-autotune, CUDA graphs)
    python bench/gpu_its.py --preset tiny --device cpu --dtype fp32 --steps 4 --size 64   # smoke run

One iteration = one guided step: a batch-2 UNet call (prompt and null rows together) and the
sampler's update. it/s counts the steps between the first and the last (the text encoder, the
initial noise and the decoder are not steps), synchronised on the device; median of --runs.
Both sides get channels-last, SDPA (flash kernels where the GPU has them) and, with --compile,
the same torch.compile mode on the UNet. Random weights, every layer randomised.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import build  # noqa: E402
from ldm.precision import NAMES  # noqa: E402



class StepClock:
    """Timestamps of each step's end, device-synchronised."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def its(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def ldm_run(pipe, args, clock):
    pipe("a photo of a cat", steps=args.steps, guidance_scale=7.5, seed=0, height=args.size, width=args.size,
         output_type="latent", callback=lambda d: clock.tick())


def diffusers_run(ref, args, clock):
    def on_step(pipe, i, t, kw):
        clock.tick()
        return kw
    ref("a photo of a cat", num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
        width=args.size, generator=torch.Generator().manual_seed(0), output_type="latent",
        callback_on_step_end=on_step)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=sorted(NAMES))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets (mode max-autotune)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), NAMES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg, ours, ref = build(args.preset)
    ours.to(device, dtype)                      # channels-last for fp16/bf16 (ldm/precision.py)
    import diffusers
    ref.to(device=device, dtype=dtype)          # both: the preset's sampler (DDIM)
    if dtype != torch.float32:
        ref.unet.to(memory_format=torch.channels_last)
    if args.compile:
        mode = "max-autotune" if device.type == "cuda" else None
        ours.compile(mode=mode)
        ref.unet.compile(mode=mode, fullgraph=True)
    rows = {}
    for name, run, obj in (("ldm", ldm_run, ours), ("diffusers", diffusers_run, ref)):
        with torch.inference_mode():
            run(obj, args, StepClock(device))            # warm-up (and compile)
            speeds = []
            for _ in range(args.runs):
                clock = StepClock(device)
                run(obj, args, clock)
                speeds.append(clock.its())
        rows[name] = statistics.median(speeds)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{gpu}, torch {torch.__version__}, diffusers {diffusers.__version__}, preset {args.preset}, "
          f"{args.size}², {args.dtype}, {args.steps} DDIM steps, CFG batch 2, compile={args.compile}")
    print("| implementation | it/s |\n|---|---|")
    for name, its in rows.items():
        print(f"| {name} | {its:.2f} |")
    print(f"| ldm / diffusers | {rows['ldm'] / rows['diffusers']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
