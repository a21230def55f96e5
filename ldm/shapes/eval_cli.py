"""`ldm eval`: prompt-adherence accuracy of a folder of images, or of a model's images for the fixed
prompt list (configs/eval_prompts.txt; one image each, image i drawn with seed + i).

DIR holds images plus a metadata.jsonl with `file_name` and `text` per line (the imagefolder
format written by `ldm.shapes.scenes`). Prints per-category accuracy and overall; --json saves it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from ldm.shapes.adherence import evaluate, load_prompts

NAME = "eval"
HELP = "score prompt adherence of generated images"
PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "eval_prompts.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", metavar="DIR",
                        help="folder with images and metadata.jsonl (file_name, text)")
    parser.add_argument("--json", metavar="PATH", help="write the results (with per-image rows)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument("--failures", action="store_true", help="also list the failed prompts")
    parser.add_argument("--model", metavar="PATH", nargs="?", const="",
                        help="generate the images with this model (no PATH: the default model)")
    parser.add_argument("--prompts", metavar="FILE", default=str(PROMPTS), help="prompt list for --model")
    parser.add_argument("--out", metavar="DIR", help="with --model: also save the images as an imagefolder")
    parser.add_argument("--steps", type=int, help="with --model: sampling steps (default: the model's)")
    parser.add_argument("--scale", type=float, help="with --model: guidance scale (default: the model's)")
    parser.add_argument("--sampler", help="with --model: sampler (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="with --model: image i uses seed + i")
    parser.add_argument("--batch", type=int, default=8, help="with --model: images per forward")
    parser.add_argument("--prior", metavar="PATH", nargs="?", const="",
                        help="with --model: draw through the prior (text -> image embedding -> image; no PATH: "
                             "the default model's prior file)")
    parser.add_argument("--prior-scale", type=float, help="with --prior: the prior's guidance scale (default 4.0)")
    parser.add_argument("--no-regions", action="store_true",
                        help="with --model: no layout plan (the network alone; see ldm/regions.py)")


def seeded_latents(config, seeds):
    """Initial noise (N, C, h, w), image k from its own seed, so that an image does not depend on
    the batch it is drawn in."""
    import torch
    shape = (1, config.unet.in_channels, config.latent_size, config.latent_size)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def generate(args) -> tuple[list[Image.Image], list[str]]:
    """One image per prompt from the model, at its default settings unless overridden."""
    from tqdm import tqdm

    from ldm.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.model or None)
    kw = dict(regions=None if args.no_regions else "auto")
    if getattr(args, "prior", None) is not None:
        from ldm.cli import attach_prior
        attach_prior(pipe, args.prior, bool(args.model))
        kw = dict(use_prior=True, prior_guidance_scale=args.prior_scale)
    prompts = load_prompts(args.prompts)[: args.limit]
    images = []
    for i in tqdm(range(0, len(prompts), args.batch), desc="generating", unit="batch"):
        chunk = prompts[i:i + args.batch]
        latents = seeded_latents(pipe.config, range(args.seed + i, args.seed + i + len(chunk)))
        images += pipe(chunk, steps=args.steps, guidance_scale=args.scale, sampler=args.sampler, latents=latents,
                       seed=args.seed + i, **kw)       # (the seed draws only what the latents don't: the prior's)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metadata.jsonl", "w") as f:
            for i, (img, p) in enumerate(zip(images, prompts)):
                img.save(out / f"{i:04d}.png")
                f.write(json.dumps({"file_name": f"{i:04d}.png", "text": p}) + "\n")
    return images, prompts


def load_imagefolder(folder, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts listed in `folder/metadata.jsonl`."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"{meta} not found (expected lines with file_name and text)")
    images, prompts = [], []
    with open(meta) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file_name" not in row or "text" not in row:
                raise ValueError(f"{meta}:{n}: needs 'file_name' and 'text'")
            with Image.open(folder / row["file_name"]) as img:
                images.append(img.convert("RGB"))
            prompts.append(row["text"])
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{meta} lists no images")
    return images, prompts


def format_table(result: dict) -> str:
    """Plain-text table: one row per category, then overall."""
    lines = [f"{'category':<12} {'n':>5} {'accuracy':>9}"]
    for cat, row in result["categories"].items():
        lines.append(f"{cat:<12} {row['n']:>5} {row['accuracy']:>9.3f}")
    lines.append(f"{'overall':<12} {result['n']:>5} {result['overall']:>9.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) is not None:
        images, prompts = generate(args)
    elif getattr(args, "images", None):
        images, prompts = load_imagefolder(args.images, getattr(args, "limit", None))
    else:
        raise ValueError("ldm eval needs --images DIR, or --model [PATH] to generate the images")
    result = evaluate(images, prompts)
    print(format_table(result))
    if getattr(args, "failures", False):
        for r in result["results"]:
            if not r["correct"]:
                print(f"FAIL [{r['category']}] {r['prompt']!r}: {r['reason']}")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldm eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
