"""The three guidance families of the seeds on the default model, against their scale: adherence
(`ldm eval`'s detector, per category), diversity, and FID against renders of the same prompts.

    pip install -e ".[bench,metrics]"
    python bench/guidance_families.py [--classifier weights/ldm-default-classifier.safetensors] \
        [--clip out/shape_clip/clip.safetensors] [--prompts 60] [--diversity-prompts 4]
        [--families cfg classifier classifier@5 semantic clip] [--scales classifier=1,4,16 semantic=0.25,1]
        [--json rows.json] [--no-report]

Families (each a scale sweep; everything else at the model's defaults, regions as by default):
- cfg: classifier-free guidance, guidance_scale s.
- classifier: noisy-classifier guidance (train_classifier.py) at CFG 1, classifier_scale s;
  classifier@5: the same on top of CFG 5.
- semantic: the gradient of a score of the *decoded* x̂0 (ldm/semantic_guidance.py): the same
  classifier's log p at t = 0 of the picture re-encoded — a clean image classifier reached through
  the decoder, at CFG 1.
- clip (with --clip, the shape-world CLIP of `python -m ldm.shapes.clip`): CLIP guidance, the
  gradient of cos(CLIP image of the decoded x̂0, CLIP text of the prompt), at CFG 1.
FID: `ldm.metrics.fid` between the images and renders of the same prompts (scene_from_prompt, seed i)
— few images, so read it as a relative number. CLIP score (`ldm.metrics.clip_score`, 100 · cos) by
the shape-world CLIP, with --clip.
Writes docs/guidance_families.md (table) and docs/guidance_families.png (plot)."""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm.shapes import noisy_classifier as nc
from ldm.pipeline import DEFAULT_CLASSIFIER, Pipeline
from ldm.semantic_guidance import clip_guidance, clip_text_score, semantic_guidance
from ldm.schedule import alphas_cumprod
from ldm.shapes.adherence import evaluate, load_prompts
from ldm.shapes.eval_cli import PROMPTS, seeded_latents

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCALES = {"cfg": (1.0, 2.0, 3.0, 5.0, 7.5), "classifier": (0.0, 1.0, 2.0, 4.0, 8.0),
          "classifier@5": (0.0, 1.0, 2.0, 4.0, 8.0), "semantic": (0.0, 2.0, 8.0, 32.0),
          "clip": (0.0, 1.0, 2.0, 4.0, 8.0)}


def spread(items: list, n: int) -> list:
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]


def settings(pipe, family: str, s: float, prompts: list[str]) -> dict:
    """pipe(...) keywords for one family at scale s (prompts: the batch's, for prompt-bound guidance)."""
    if family == "cfg":
        return {"guidance_scale": s}
    if family.startswith("classifier"):
        return {"guidance_scale": 5.0 if family == "classifier@5" else 1.0, "classifier_scale": s}
    if family == "clip":
        score = clip_text_score(pipe.clip, pipe.clip.tokenizer, prompts)
        return {"guidance_scale": 1.0, "guidance": [clip_guidance(pipe, score, s)] if s else []}
    return {"guidance_scale": 1.0, "guidance": [clean_classifier_guidance(pipe, prompts, s)] if s else []}


def clean_classifier_guidance(pipe, prompts, s):
    """Semantic guidance by score(picture) = log p_φ(grid | E(picture), t = 0), through the decoder."""
    score = nc.prompt_log_prob(pipe.classifier, [nc.prompt_target(p, pipe.classifier.config) for p in prompts])
    vae, k = pipe.vae, pipe.config.autoencoder.scale_factor
    t0 = torch.zeros(len(prompts), dtype=torch.long)
    # at the learned network's size (resample=False): the fixed ×8 up- and down-sampling cancel out
    encode = lambda x: vae.encode(x, resample=False).mean * k                 # noqa: E731
    decode = lambda z: vae.decode(z / k, resample=False)                      # noqa: E731
    ac = alphas_cumprod(pipe.config.schedule)
    return lambda model_fn: semantic_guidance(model_fn, lambda x: score(encode(x), t0[:len(x)]), decode, ac, s)


def draw(pipe, family, s, prompts, seeds):
    images = []
    for i in range(0, len(prompts), 8):
        chunk = prompts[i:i + 8]
        images += pipe(chunk, latents=seeded_latents(pipe.config, seeds[i:i + 8]), **settings(pipe, family, s, chunk))
    return images


def diversity(pipe, family, s, prompts, n: int = 6) -> float:
    """Mean pairwise RMS pixel distance between n images of each prompt."""
    dists = []
    for p in prompts:
        images = draw(pipe, family, s, [p] * n, list(range(1000, 1000 + n)))
        arrays = [np.asarray(im, np.float32) / 255 for im in images]
        dists += [float(np.sqrt(((a - b) ** 2).mean())) for a, b in itertools.combinations(arrays, 2)]
    return float(np.mean(dists))


def renders(prompts, size: int, folder: Path) -> Path:
    """The ground-truth picture of each prompt (its scene drawn with seed i), the FID reference."""
    from ldm.shapes.scenes import render, scene_from_prompt
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(prompts):
        render(scene_from_prompt(p, seed=i), size).save(folder / f"{i:04d}.png")
    return folder


def run(pipe, families, prompts, div_prompts, reference: Path, scales=SCALES) -> list[dict]:
    from ldm.metrics import clip_score, fid
    rows = []
    for family in families:
        for s in scales[family]:
            start = time.perf_counter()
            images = draw(pipe, family, s, prompts, list(range(len(prompts))))
            result = evaluate(images, prompts)
            row = {"family": family, "scale": s, "overall": result["overall"],
                   **{c: v["accuracy"] for c, v in result["categories"].items()},
                   "diversity": diversity(pipe, family, s, div_prompts),
                   "fid": fid(reference, images, progress=False)}
            if getattr(pipe, "clip", None) is not None:
                row["clip_score"] = clip_score(images, prompts, model=pipe.clip, preprocess=pipe.clip.preprocess,
                                               tokenizer=pipe.clip.tokenizer)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def write_report(rows, n, n_div, note: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cats = [k for k in rows[0] if k not in ("family", "scale", "overall", "diversity", "fid", "clip_score", "seconds")]
    clip = "clip_score" in rows[0]
    lines = ["# The three guidance families on the default model", "",
             f"`python bench/guidance_families.py` — {n} eval prompts (one image each, seed i) for adherence "
             f"and FID (against renders of the same prompts; {n} images, so a relative number), {n_div} prompts × 6 "
             f"images for diversity (mean pairwise RMS in [0, 1] pixels). {note}", "",
             "| family | scale | overall | " + " | ".join(cats) + " | diversity | FID |" + (" CLIP score |" if clip else ""),
             "|---" * (len(cats) + 5 + clip) + "|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['scale']} | {r['overall']:.3f} | "
                     + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cats)
                     + f" | {r['diversity']:.4f} | {r['fid']:.1f} |" + (f" {r['clip_score']:.2f} |" if clip else ""))
    DOCS.mkdir(exist_ok=True)
    (DOCS / "guidance_families.md").write_text("\n".join(lines) + "\n")
    families = list(dict.fromkeys(r["family"] for r in rows))
    keys = ("overall", "diversity", "fid", "clip_score")[:3 + clip]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    for family in families:
        rs = [r for r in rows if r["family"] == family]
        for ax, key in zip(axes, keys):
            ax.set_xscale("symlog", linthresh=1)       # the families' scales span 0.25 to 16
            ax.plot([r["scale"] for r in rs], [r[key] for r in rs], "o-", label=family)
    for ax, title in zip(axes, ("adherence (overall)", "diversity (pairwise RMS)", "FID vs renders",
                                "CLIP score (shape-world CLIP)")):
        ax.set_title(title)
        ax.set_xlabel("guidance scale of the family")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "guidance_families.png", dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="noisy classifier (train_classifier.py)")
    ap.add_argument("--clip", help="the shape-world CLIP (python -m ldm.shapes.clip): CLIP score column, clip family")
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--diversity-prompts", type=int, default=4)
    ap.add_argument("--families", nargs="+", default=[f for f in SCALES if f != "clip"], choices=list(SCALES))
    ap.add_argument("--scales", nargs="+", metavar="FAMILY=S,S", default=[],
                    help="other scales for a family, e.g. classifier=2,8")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--no-report", action="store_true", help="print the rows only (docs/ untouched)")
    args = ap.parse_args()
    if not args.no_report:
        import matplotlib  # noqa: F401  (checked now, not after an hour of sampling)
    pipe = Pipeline.from_pretrained(args.model)
    nc.attach(pipe, args.classifier)
    if "clip" in args.families and not args.clip:
        ap.error("the clip family needs --clip PATH")
    if args.clip:
        from ldm.shapes.clip import load
        pipe.clip = load(args.clip)
    prompts = load_prompts(PROMPTS)
    subset, div_prompts = spread(prompts, args.prompts), spread(prompts, args.diversity_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        reference = renders(subset, pipe.config.sample_size, Path(tmp) / "renders")
        scales = {f: tuple(map(float, v.split(","))) for f, _, v in (a.partition("=") for a in args.scales)}
        rows = run(pipe, args.families, subset, div_prompts, reference, {**SCALES, **scales})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.no_report:
        write_report(rows, len(subset), len(div_prompts), f"{pipe.config.default_sampler}, "
                     f"{pipe.config.default_steps} steps, regions as by default.")


if __name__ == "__main__":
    main()
