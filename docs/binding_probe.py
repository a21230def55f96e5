"""Two probes of how a model binds colours to shapes (docs/default_model.md, "Why binding fails").

1. Where the text encoder puts each word: for "a red circle and a blue square", change one word at a
   time and measure how far each output token moves (L2). A row is the changed word, a column an
   output position; large entries off the diagonal mean a word's meaning is carried by later tokens.
2. Where the UNet puts each object: on relation prompts ("A left of B") with two different shapes and
   colours, is the pair of shapes, and separately the pair of colours, drawn in the named order,
   reversed, or not both found?

    python docs/binding_probe.py [--model PATH] [--prompts 60]
"""
from __future__ import annotations

import argparse
import random
from collections import Counter

import torch

from ldm.data.scenes import caption, random_scene
from ldm.eval.adherence import relation_holds
from ldm.eval.detect import detect
from ldm.eval.prompts import parse
from ldm.pipeline import Pipeline

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


def relation_order(pipe: Pipeline, n: int) -> Counter:
    """Counts of ("shape" | "colour", "named order" | "reversed" | "not both found") over n prompts."""
    prompts, i = [], 0
    while len(prompts) < n:
        rng = random.Random(f"binding-probe:{i}")
        i += 1
        a, b = (scene := random_scene(rng, ("two_objects",))).objects
        if scene.relation and a.shape != b.shape and a.colour != b.colour:
            prompts.append(caption(scene, rng))
    counts = Counter()
    for k in range(0, n, 25):
        images = pipe(prompts[k:k + 25], seed=k)
        for prompt, image in zip(prompts[k:k + 25], images):
            spec, (dets, _) = parse(prompt), detect(image)
            for attr in ("shape", "colour"):
                firsts, seconds = ([d for d in dets if getattr(d, attr) == getattr(o, attr)] for o in spec.objects)
                pairs = [(x, y) for x in firsts for y in seconds if x is not y]
                named = any(relation_holds(x, y, spec.relation) for x, y in pairs)
                reverse = any(relation_holds(y, x, spec.relation) for x, y in pairs)
                counts[attr, "named order" if named else "reversed" if reverse else "not both found"] += 1
    return counts


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


if __name__ == "__main__":
    main()
