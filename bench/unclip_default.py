"""A model that draws variations (the default model, or train_unclip.py's unCLIP forms), measured
with `ldm eval`'s detector and the model's own CLIP image encoder:

- variations: a rendered scene of each eval prompt (scene_from_prompt, seed i) -> `--variations`
  images drawn from its CLIP image embedding alone (no prompt); a variation "keeps the source's
  objects" when the detector finds in it everything the source's prompt states. Chance: the same
  variations scored against the next source's prompt. Ceiling: the sources themselves.
- text -> prior -> image: adherence of the unCLIP model drawing from the prompt through its prior,
  next to the text-conditioned default model (with and without its layout planner), same prompts
  and seeds.

    python bench/unclip_default.py [--model FILE] [--sources 50] [--variations 4] [--prompts 100] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch.nn.functional as F

from ldm.pipeline import Pipeline, default_model_path
from ldm.shapes.adherence import aggregate, load_prompts, score
from ldm.shapes.eval_cli import PROMPTS
from ldm.shapes.scenes import render, scene_from_prompt


def spread(prompts: list[str], n: int) -> list[str]:
    """n prompts taken evenly through the list (the eval file is grouped by category)."""
    step = max(len(prompts) / n, 1)
    return [prompts[int(i * step)] for i in range(min(n, len(prompts)))]


def variations(pipe, prompts: list[str], k: int, steps) -> dict:
    """Rows: the detector's verdicts, and the CLIP image cosine (the model's own image encoder) of
    each variation to its source and to the next source."""
    kept, chance, ceiling, sources, drawn = [], [], [], [], []
    for i, prompt in enumerate(prompts):
        source = render(scene_from_prompt(prompt, seed=i), 512)
        ceiling.append(score(source, prompt))
        images = pipe(image=source, num_images_per_prompt=k, seed=i, steps=steps)
        other = prompts[(i + 1) % len(prompts)]
        kept += [score(im, prompt) for im in images]
        chance += [score(im, other) for im in images]
        sources.append(source)
        drawn.append(list(images))
    rows = {name: {"overall": a["overall"], **{c: v["accuracy"] for c, v in a["categories"].items()}}
            for name, a in (("variations keep", aggregate(kept)), ("chance", aggregate(chance)),
                            ("sources (ceiling)", aggregate(ceiling)))}
    src = F.normalize(pipe.encode_image_embedding(sources).float(), dim=-1)                  # (S, D)
    var = F.normalize(pipe.encode_image_embedding([im for row in drawn for im in row]).float(), dim=-1)
    own = (var * src.repeat_interleave(k, 0)).sum(-1).mean().item()
    next_ = (var * src.roll(-1, 0).repeat_interleave(k, 0)).sum(-1).mean().item()
    rows["CLIP cosine to own source / to next source"] = {"own": own, "next": next_}
    return rows


def text_paths(unclip, base, prompts: list[str], steps) -> dict:
    rows = {}
    for name, draw in (("text -> prior -> unCLIP decoder", lambda p, s: unclip(p, seed=s, steps=steps)),
                       ("default model, no regions", lambda p, s: base(p, seed=s, steps=steps, regions=None)),
                       ("default model (layout planner)", lambda p, s: base(p, seed=s, steps=steps))):
        results = [score(draw(p, i)[0], p) for i, p in enumerate(prompts)]
        a = aggregate(results)
        rows[name] = {"overall": a["overall"], **{c: v["accuracy"] for c, v in a["categories"].items()}}
    return rows


def table(title: str, rows: dict) -> str:
    cats = [c for c in ("single", "colour", "position", "counting", "two_objects") if c in next(iter(rows.values()))]
    lines = [f"| {title} | overall | " + " | ".join(cats) + " |", "|---|" + "---|" * (len(cats) + 1)]
    for name, r in rows.items():
        if "own" in r:
            lines.append(f"\n{name}: {r['own']:.3f} / {r['next']:.3f}")
            continue
        lines.append(f"| {name} | {r['overall']:.2f} | " + " | ".join(f"{r[c]:.2f}" for c in cats) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_path()), help="a model that draws variations (train_unclip.py)")
    p.add_argument("--sources", type=int, default=50)
    p.add_argument("--variations", type=int, default=4)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--steps", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    unclip, base = Pipeline.from_pretrained(args.model), Pipeline.from_pretrained(None)
    prompts = load_prompts(PROMPTS)
    start = time.time()
    var = variations(unclip, spread(prompts, args.sources), args.variations, args.steps)
    print(table(f"{args.sources} sources × {args.variations} variations", var))
    txt = None
    if unclip.config.prior is not None:        # a decoder alone (train_unclip.py part=decoder) has no text path
        txt = text_paths(unclip, base, spread(prompts, args.prompts), args.steps)
        print()
        print(table(f"{args.prompts} eval prompts, one image each", txt))
    print(f"\n{time.time() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"variations": var, "text": txt}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
