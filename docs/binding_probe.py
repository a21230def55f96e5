"""Three probes of how a model binds colours to shapes (docs/default_model.md, "Why binding fails").

1. Where the text encoder puts each word: for "a red circle and a blue square", change one word at a
   time and measure how far each output token moves (L2). A row is the changed word, a column an
   output position; large entries off the diagonal mean a word's meaning is carried by later tokens.
2. Where the UNet puts each object: on relation prompts ("A left of B") with two different shapes and
   colours, is the pair of shapes, and separately the pair of colours, drawn in the named order,
   reversed, or not both found?
3. Who decides where each colour (shape) goes, the prompt or the starting noise? Each relation
   prompt is drawn again from the same noise with its two colour (shape) words exchanged. If the
   prompt decides, the two colours (shapes) trade places; if the noise decides, they stay put.
   Beside it, the first sampling step's x0 prediction: how much it varies across starting noises
   for a fixed prompt, and across prompts for a fixed noise.

    python docs/binding_probe.py [--model PATH] [--prompts 60]
"""
from __future__ import annotations

import argparse
import random
from collections import Counter

import torch

from ldm.shapes.scenes import caption, random_scene
from ldm.shapes.adherence import relation_holds
from ldm.shapes.detect import detect
from ldm.shapes.prompts import parse
from ldm.pipeline import Pipeline
from ldm.schedule import alphas_cumprod, eps_and_x0_at, sampling_timesteps

PROBE = "a red circle and a blue square"
SWAP = {"a": "one", "red": "green", "circle": "star", "and": "with", "blue": "yellow", "square": "heart"}


@torch.no_grad()
def word_sensitivity(pipe: Pipeline, text: str = PROBE) -> list[tuple[str, list[float]]]:
    """(changed word, L2 change of output tokens 1..n+1) for each word of `text` (one BPE token each)."""
    te = pipe.text_encoder
    words = text.split()
    base = te.encode([text])[0]
    rows = []
    for j, word in enumerate(words):
        changed = " ".join(SWAP[w] if i == j else w for i, w in enumerate(words))
        out = te.encode([changed])[0]
        rows.append((word, [(out[i] - base[i]).norm().item() for i in range(1, len(words) + 2)]))
    return rows


def relation_prompts(n: int) -> list[str]:
    """n captions of two-object relation scenes whose objects differ in both shape and colour."""
    prompts, i = [], 0
    while len(prompts) < n:
        rng = random.Random(f"binding-probe:{i}")
        i += 1
        a, b = (scene := random_scene(rng, ("two_objects",))).objects
        if scene.relation and a.shape != b.shape and a.colour != b.colour:
            prompts.append(caption(scene, rng))
    return prompts


def matching(dets, obj, attr: str) -> list:
    """The detections whose `attr` ("shape" or "colour") is the object's."""
    return [d for d in dets if getattr(d, attr) == getattr(obj, attr)]


def relation_order(pipe: Pipeline, n: int) -> Counter:
    """Counts of ("shape" | "colour", "named order" | "reversed" | "not both found") over n prompts."""
    prompts = relation_prompts(n)
    counts = Counter()
    for k in range(0, n, 25):
        images = pipe(prompts[k:k + 25], seed=k)
        for prompt, image in zip(prompts[k:k + 25], images):
            spec, (dets, _) = parse(prompt), detect(image)
            for attr in ("shape", "colour"):
                firsts, seconds = (matching(dets, o, attr) for o in spec.objects)
                pairs = [(x, y) for x in firsts for y in seconds if x is not y]
                named = any(relation_holds(x, y, spec.relation) for x, y in pairs)
                reverse = any(relation_holds(y, x, spec.relation) for x, y in pairs)
                counts[attr, "named order" if named else "reversed" if reverse else "not both found"] += 1
    return counts


def exchange(prompt: str, x: str, y: str) -> str | None:
    """`prompt` with the words x and y trading places, or None unless each occurs exactly once."""
    words, swap = prompt.split(), {x: y, y: x}
    bare = [w.strip(".,") for w in words]
    if bare.count(x) != 1 or bare.count(y) != 1:
        return None
    return " ".join(w.replace(b, swap[b]) if b in swap else w for w, b in zip(words, bare))


def seed_or_text(pipe: Pipeline, n: int, attr: str) -> Counter:
    """For up to n relation prompts and the same prompts with their two `attr` words exchanged, drawn
    from the same noise: does the pair of `attr` values trade places ("prompt decides") or stay
    ("noise decides")? Pairs where either image lacks exactly one of each are "not both found"."""
    pairs = []  # (prompt, the prompt with its two attr words exchanged, its two objects)
    for prompt in relation_prompts(n):
        objects = parse(prompt).objects
        if (swapped := exchange(prompt, *(getattr(o, attr) for o in objects))) is not None:
            pairs.append((prompt, swapped, objects))
    counts = Counter()
    for k in range(0, len(pairs), 25):
        chunk = pairs[k:k + 25]
        firsts = pipe([p for p, _, _ in chunk], seed=k)
        seconds = pipe([q for _, q, _ in chunk], seed=k)   # same seed: the same noise per item
        for (_, _, objects), one, two in zip(chunk, firsts, seconds):
            offsets = []
            for image in (one, two):
                dets, _ = detect(image)
                da, db = (matching(dets, o, attr) for o in objects)
                offsets.append((da[0].cx - db[0].cx, da[0].cy - db[0].cy) if len(da) == len(db) == 1 else None)
            if None in offsets:
                counts["not both found"] += 1
                continue
            (x1, y1), (x2, y2) = offsets
            counts["prompt decides" if x1 * x2 + y1 * y2 < 0 else "noise decides"] += 1
    return counts


FIRST_STEP_PROMPTS = ("a red circle to the left of a blue square", "a blue circle to the left of a red square",
                      "a green star above a yellow heart", "a yellow star above a green heart")


@torch.no_grad()
def first_step_x0(pipe: Pipeline, noises: int = 4) -> dict[str, float]:
    """x0 predicted at the first sampling step (default steps) for FIRST_STEP_PROMPTS × `noises`
    starting noises: its std across noises (prompt fixed), across prompts (noise fixed), and the RMS
    moves from exchanging "red" and "blue" (same noise) and from another noise (same prompt)."""
    cfg = pipe.config
    t = int(sampling_timesteps(cfg.default_steps, cfg.schedule)[0])
    noise = torch.randn(noises, cfg.unet.in_channels, cfg.latent_size, cfg.latent_size,
                        generator=torch.Generator().manual_seed(0))
    alpha_bar = float(alphas_cumprod(cfg.schedule)[t])
    x0 = torch.stack([eps_and_x0_at(pipe.unet(noise, torch.full((noises,), t), pipe.encode_prompt([p] * noises)),
                                    noise, alpha_bar, cfg.schedule.prediction_type)[1]
                      for p in FIRST_STEP_PROMPTS])                            # (prompts, noises, C, h, w)
    return {"t": t, "across noises": x0.std(dim=1).mean().item(), "across prompts": x0.std(dim=0).mean().item(),
            "red/blue exchanged": (x0[0] - x0[1]).pow(2).mean().sqrt().item(),
            "another noise": (x0[0, 0] - x0[0, 1]).pow(2).mean().sqrt().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model file (default: the shipped default model)")
    p.add_argument("--prompts", type=int, default=60)
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    words = PROBE.split()
    print(f"text encoder: change of each output token when one word of {PROBE!r} changes")
    print("changed  | " + " ".join(f"{w:>7s}" for w in words + ["<eos>"]))
    for word, row in word_sensitivity(pipe):
        print(f"{word:8s} | " + " ".join(f"{v:7.2f}" for v in row))
    counts = relation_order(pipe, args.prompts)
    print(f"UNet, {args.prompts} relation prompts (default settings):")
    for attr in ("shape", "colour"):
        print(f"  {attr:6s}: " + ", ".join(f"{k} {counts[attr, k]}" for k in ("named order", "reversed",
                                                                               "not both found")))
    print(f"same noise, the two words exchanged ({args.prompts} relation prompts):")
    for attr in ("colour", "shape"):
        counts = seed_or_text(pipe, args.prompts, attr)
        print(f"  {attr:6s}: " + ", ".join(f"{k} {counts[k]}" for k in ("prompt decides", "noise decides",
                                                                        "not both found")))
    first = first_step_x0(pipe)
    print(f"first step's x0 (t = {first.pop('t')}): " + ", ".join(f"{k} {v:.3f}" for k, v in first.items()))


if __name__ == "__main__":
    main()
