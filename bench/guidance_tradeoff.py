"""The guidance trade-off the seeds describe, measured on a model: prompt adherence and diversity
for several classifier-free guidance scales, and DDIM vs DPM-Solver++(2M) at several step counts.

    pip install -e ".[bench]"   # matplotlib, for the plot
    python bench/guidance_tradeoff.py [--model PATH] [--prompts 100] [--diversity-prompts 8]

Adherence: `ldm eval` accuracy on the first N fixed eval prompts (one image each, seed i).
Diversity: mean pairwise RMS distance (pixels in [0, 1]) between 8 images of the same prompt.
Writes docs/guidance.md (tables) and docs/guidance.png (plot)."""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from ldm.shapes.adherence import evaluate, load_prompts
from ldm.shapes.eval_cli import PROMPTS, seeded_latents
from ldm.pipeline import Pipeline

SCALES = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def draw(pipe, prompts, seeds, **kw):
    """One image per (prompt, seed), each from its own seeded noise."""
    images = []
    for i in range(0, len(prompts), 8):
        images += pipe(prompts[i:i + 8], latents=seeded_latents(pipe.config, seeds[i:i + 8]), **kw)
    return images


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all of them if n >= len), so that every category of
    the category-ordered prompt file is represented in proportion."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]


def adherence(pipe, prompts, **kw) -> dict:
    return evaluate(draw(pipe, prompts, list(range(len(prompts))), **kw), prompts)


def diversity(pipe, prompts, n: int = 8, **kw) -> float:
    """Mean pairwise RMS pixel distance between n images of each prompt, averaged over prompts."""
    dists = []
    for p in prompts:
        arrays = [np.asarray(im, dtype=np.float32) / 255 for im in draw(pipe, [p] * n, list(range(1000, 1000 + n)), **kw)]
        dists += [float(np.sqrt(((a - b) ** 2).mean())) for a, b in itertools.combinations(arrays, 2)]
    return float(np.mean(dists))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--diversity-prompts", type=int, default=8)
    args = ap.parse_args()
    try:
        import matplotlib  # noqa: F401  (checked now, not after an hour of sampling)
    except ImportError:
        raise SystemExit('the plot needs matplotlib: pip install -e ".[bench]"')
    pipe = Pipeline.from_pretrained(args.model)
    prompts = load_prompts(PROMPTS)
    subset, div_prompts = spread(prompts, args.prompts), spread(prompts, args.diversity_prompts)

    rows = []
    for s in SCALES:
        r = adherence(pipe, subset, guidance_scale=s)
        rows.append({"scale": s, "overall": r["overall"],
                     **{c: v["accuracy"] for c, v in r["categories"].items()},
                     "diversity": diversity(pipe, div_prompts, guidance_scale=s)})
        print(json.dumps(rows[-1]), flush=True)
    solver_rows = []
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in (10, 20, 50):
            r = adherence(pipe, subset, sampler=sampler, steps=steps)
            solver_rows.append({"sampler": sampler, "steps": steps, "overall": r["overall"]})
            print(json.dumps(solver_rows[-1]), flush=True)
    write_report(rows, solver_rows, len(subset), len(div_prompts), pipe)


def write_report(rows, solver_rows, n, n_div, pipe):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cats = [k for k in rows[0] if k not in ("scale", "overall", "diversity")]
    lines = ["# Guidance trade-off of the default model", "",
             f"`python bench/guidance_tradeoff.py` — {n} eval prompts (one image each) for adherence, "
             f"{n_div} prompts × 8 images for diversity; {pipe.config.default_sampler}, "
             f"{pipe.config.default_steps} steps unless stated"
             + (f"; two-object prompts drawn with the regions planned by the model's layout planner "
                f"(`{pipe.config.layout_planner}`, ldm/shapes/layout.py), as by default" if pipe.config.layout_planner else "")
             + ".", "",
             "| guidance scale | overall | " + " | ".join(cats) + " | diversity (RMS px) |",
             "|---" * (len(cats) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['scale']} | {r['overall']:.3f} | " + " | ".join(f"{r[c]:.3f}" for c in cats)
                     + f" | {r['diversity']:.4f} |")
    lines += ["", f"Solvers (guidance scale {pipe.config.default_guidance_scale}):", "",
              "| sampler | 10 steps | 20 steps | 50 steps |", "|---|---|---|---|"]
    for sampler in ("ddim", "dpmpp_2m"):
        acc = {r["steps"]: r["overall"] for r in solver_rows if r["sampler"] == sampler}
        lines.append(f"| {sampler} | {acc[10]:.3f} | {acc[20]:.3f} | {acc[50]:.3f} |")
    DOCS.mkdir(exist_ok=True)
    (DOCS / "guidance.md").write_text("\n".join(lines) + "\n")
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    scales = [r["scale"] for r in rows]
    ax1.plot(scales, [r["overall"] for r in rows], "o-", color="tab:blue", label="adherence (overall)")
    ax1.set_xlabel("guidance scale s")
    ax1.set_ylabel("adherence", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(scales, [r["diversity"] for r in rows], "s--", color="tab:red", label="diversity")
    ax2.set_ylabel("diversity (mean pairwise RMS)", color="tab:red")
    ax1.set_title("Classifier-free guidance: adherence vs diversity")
    fig.tight_layout()
    fig.savefig(DOCS / "guidance.png", dpi=100)


if __name__ == "__main__":
    main()
