"""docs/variations.png: the default model's image variations. Each row: a rendered scene (the source),
then four variations drawn from its CLIP image embedding alone (no prompt), seed 0:

    ldm generate --image scene.png --variations 4 --seed 0 -o var.png

    python docs/make_variations_grid.py [--inputs DIR]    (DIR: also write the source scenes there)"""
import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from ldm import Pipeline
from ldm.shapes.scenes import render, scene_from_prompt

# scenes of the prompts below (scene_from_prompt, seed 0): one row each
SOURCES = ["a red star", "a blue ring on a beige background", "a green heart on the left",
           "two yellow squares"]
N, SEED = 4, 0


def main(inputs: Path | None = None, size: int = 192):
    pipe = Pipeline.from_pretrained()
    label, gap = 22, 8
    grid = Image.new("RGB", ((N + 1) * size + gap, len(SOURCES) * (size + label)), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(SOURCES):
        source = render(scene_from_prompt(prompt, seed=0), pipe.config.sample_size)
        if inputs is not None:
            inputs.mkdir(parents=True, exist_ok=True)
            source.save(inputs / f"scene-{row}.png")
        images = pipe(image=source, num_images_per_prompt=N, seed=SEED)
        y = row * (size + label)
        for col, im in enumerate([source, *images]):
            grid.paste(im.resize((size, size), Image.Resampling.LANCZOS), (col * size + (gap if col else 0), y))
        draw.text((4, y + size + 5), f"source: \"{prompt}\"", fill="black")
        draw.text(((N + 1) * size + gap - 190, y + size + 5), f"{N} variations, seed {SEED}, no prompt", fill="black")
    out = Path(__file__).resolve().parent / "variations.png"
    grid.save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, help="also write the source scenes here")
    main(parser.parse_args().inputs)
