"""`ldm interpolate A B --seeds 1 2 --frames 16 -o walk.gif`: the frames of `Pipeline.interpolate`
(ldm/interpolate.py) as NAME-000.png ... and an animated GIF, each written atomically."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

NAME = "interpolate"
HELP = "frames walking between two prompts (or images) and seeds, and an animated GIF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ends", nargs=2, metavar="END", help="two prompts (or, with --images, two image files)")
    parser.add_argument("--images", action="store_true", help="the ends are image files (variation / unCLIP model)")
    parser.add_argument("--seeds", nargs=2, type=int, default=[0, 1], metavar="SEED")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("-o", "--output", default="walk.gif", help="the GIF; frames beside it as NAME-000.png ...")
    parser.add_argument("--model", metavar="PATH", help="model file or folder (default: the default model)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--scale", type=float, dest="guidance_scale")
    parser.add_argument("--sampler")
    parser.add_argument("--duration", type=int, default=120, help="milliseconds per GIF frame")
    parser.add_argument("--no-regions", action="store_true",
                        help="no layout plan (the default model's planner places each end's boxes; without it "
                             "the walk is smoother, and the ends are the plain calls with --no-regions)")


def run(args) -> None:
    from PIL import Image

    from .formats.files import atomic_write
    from .pipeline import Pipeline
    out = Path(args.output)
    if out.suffix.lower() != ".gif":
        raise SystemExit(f"ldm interpolate: -o must name a .gif, got {out}")
    if args.frames < 2:
        raise SystemExit(f"ldm interpolate: --frames must be >= 2, got {args.frames}")
    ends = [Image.open(p).convert("RGB") for p in args.ends] if args.images else None
    pipe = Pipeline.from_pretrained(args.model)
    kw = {k: getattr(args, k) for k in ("steps", "guidance_scale", "sampler") if getattr(args, k) is not None}
    if args.no_regions:
        kw["regions"] = None
    frames = pipe.interpolate(None if args.images else list(args.ends), args.seeds, args.frames, ends, **kw)
    width = max(3, math.ceil(math.log10(len(frames))))
    for i, frame in enumerate(frames):
        atomic_write(out.with_name(f"{out.stem}-{i:0{width}d}.png"), lambda tmp, f=frame: f.save(tmp, format="PNG"))
    atomic_write(out, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                 duration=args.duration, loop=0))
    print(f"wrote {out} ({len(frames)} frames) and {out.stem}-*.png")
