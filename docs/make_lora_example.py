"""The shape-world LoRA shipped in weights/loras/beige.safetensors: a style that puts every scene of the
default model on a beige background, whichever background the seed would have given.

    python docs/make_lora_example.py data out/lora_beige/data --n 2000    # scenes on beige, 64 px
    python train_ldm.py --config configs/train_lora_beige.yaml             # ~12 min on one CPU thread
    cp out/lora_beige/lora.safetensors weights/loras/beige.safetensors
    python docs/make_lora_example.py picture docs/lora_example.png         # before / after

Captions are the shape world's own, less any that name a background (the style has no trigger word:
loaded, it applies to every prompt). Why beige and not a new colour: the default autoencoder
reconstructs any flat background as one of its four (sky blue comes back light grey-lavender, white as
beige), so no LoRA of the UNet can draw a fifth; it can only choose among what the decoder draws."""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BACKGROUND = "beige"
PROMPTS = ("a red circle", "two yellow squares", "a green star on the left", "a purple cross above an orange heart")


def write_data(out: Path, n: int, size: int = 64, seed: int = 0) -> None:
    from ldm.shapes.scenes import caption, held_out, random_scene, render
    out.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    while len(rows) < n:
        rng = random.Random(f"lora-{BACKGROUND}:{seed}:{i}")
        i += 1
        scene = random_scene(rng, ("single", "position", "counting", "two_objects"),
                             lambda c, s: not held_out(c, s))
        text = caption(scene, rng)
        if "background" in text or "backdrop" in text:
            continue
        name = f"{len(rows):05d}.png"
        render(replace(scene, background=BACKGROUND), size).save(out / name)
        rows.append({"file_name": name, "text": text})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def picture(path: Path, lora: Path, steps: int = 25) -> None:
    """Row 1: the default model; row 2: with the LoRA; same prompts and seeds (256 px tiles)."""
    sys.path.insert(0, str(REPO))
    from ldm import Pipeline
    pipe = Pipeline.from_pretrained()
    rows = [pipe(list(PROMPTS), seed=0, steps=steps)]
    pipe.load_lora(lora, 1.0)
    rows.append(pipe(list(PROMPTS), seed=0, steps=steps))
    tile = 256
    grid = Image.new("RGB", (tile * len(PROMPTS), tile * 2), "white")
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            grid.paste(im.resize((tile, tile), Image.LANCZOS), (c * tile, r * tile))
    grid.save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the training images and metadata.jsonl")
    d.add_argument("out", type=Path)
    d.add_argument("--n", type=int, default=2000)
    g = sub.add_parser("picture", help="the before/after picture")
    g.add_argument("out", type=Path)
    g.add_argument("--lora", type=Path, default=REPO / "weights" / "loras" / f"{BACKGROUND}.safetensors")
    args = p.parse_args(argv)
    if args.cmd == "data":
        write_data(args.out, args.n)
    else:
        picture(args.out, args.lora)


if __name__ == "__main__":
    main()
