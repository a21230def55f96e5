"""ldm vs diffusers on the same random SD1.5-size weights, in one process, alternating runs.

    python bench/bench_generate.py                 # (a) one UNet call, (b) a 512² guided generation
    python bench/bench_generate.py --preset tiny   # a quick smoke run

Times are medians of --runs runs; peak memory (max RSS) is measured in a fresh subprocess per
implementation, since a process's peak can't be reset."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(preset: str):
    """Our pipeline with random weights, and the same weights in a diffusers StableDiffusionPipeline."""
    from ldm import LatentDiffusion, Pipeline
    from ldm.presets import PRESETS
    from ldm.interop import to_diffusers
    torch.manual_seed(0)
    cfg = PRESETS[preset]()
    model = LatentDiffusion(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised layers too, so every path computes
            p.normal_(0, 0.02)
    ours = Pipeline(model)
    return cfg, ours, to_diffusers(ours)


def tasks(cfg, ours, ref, steps: int):
    """name -> (ldm callable, diffusers callable) doing the same work."""
    g = torch.Generator().manual_seed(0)
    lat = cfg.latent_size
    x = torch.randn(2, cfg.unet.in_channels, lat, lat, generator=g)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    size = cfg.sample_size

    def ours_unet():
        with torch.no_grad():
            ours.unet(x, t, ctx)

    def ref_unet():
        with torch.no_grad():
            ref.unet(x, t, encoder_hidden_states=ctx)

    def ours_gen():
        ours("a red circle", steps=steps, guidance_scale=7.5, seed=0, height=size, width=size)

    def ref_gen():
        ref("a red circle", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
            generator=torch.Generator().manual_seed(0))

    return {f"UNet call, batch 2, {lat}×{lat} latents": (ours_unet, ref_unet),
            f"{size}² generation, {steps} DDIM steps, guidance 7.5": (ours_gen, ref_gen)}


def reset_peak_rss() -> None:
    """Linux: make VmHWM (peak RSS) start again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def memory_child(args) -> None:
    """Run in a fresh process: load one implementation only, run the generation, print peak RSS."""
    cfg, ours, ref = build(args.preset)
    which = ours if args.memory == "ldm" else ref
    del ours, ref
    import gc
    gc.collect()
    fn = list(tasks(cfg, which, which, args.steps).values())[1][0 if args.memory == "ldm" else 1]
    reset_peak_rss()  # building put both models in memory at once; count only the generation
    fn()
    print(json.dumps({"peak_rss_gb": peak_rss_gb()}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--memory", choices=["ldm", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help="skip the timings")
    args = p.parse_args()
    if args.memory:
        return memory_child(args)
    mem_rows = memory_rows(args)
    if args.memory_only:
        return print(mem_rows)
    cfg, ours, ref = build(args.preset)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}\n")
    print("| task | ldm (s) | diffusers (s) | ldm / diffusers |\n|---|---|---|---|")
    for name, (a, b) in tasks(cfg, ours, ref, args.steps).items():
        a(), b()  # warm-up
        ta, tb = [], []
        for _ in range(args.runs):  # alternate, so drift in machine load hits both alike
            for fn, ts in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(f"| {name} | {ma:.3f} | {mb:.3f} | {ma / mb:.3f} |", flush=True)
    print(mem_rows)


def memory_rows(args) -> str:
    """Peak RSS of one generation, each implementation in a fresh process."""
    mem = {}
    for which in ("ldm", "diffusers"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                              "--memory", which], capture_output=True, text=True, check=True).stdout
        mem[which] = json.loads(out.strip().splitlines()[-1])["peak_rss_gb"]
    return (f"| peak RSS during a generation (GB) | {mem['ldm']:.2f} | {mem['diffusers']:.2f} | "
            f"{mem['ldm'] / mem['diffusers']:.3f} |")


if __name__ == "__main__":
    main()
