"""docs/variations.png: the default model's unCLIP form (weights/ldm-default-unclip.safetensors,
train_unclip.py). Rows 1-3: a rendered scene, then 4 variations drawn from its CLIP image embedding
alone (`ldm generate --image scene.png --variations 4`). Row 4: text -> prior -> image for 5 prompts."""
from pathlib import Path

from PIL import Image, ImageDraw

from ldm import Pipeline
from ldm.pipeline import DEFAULT_UNCLIP
from ldm.shapes.scenes import render, scene_from_prompt

SOURCES = ["two blue squares on the left", "a yellow star above a green heart", "three red circles"]
PROMPTS = ["a red circle", "two green triangles", "a blue square to the left of a yellow star",
           "a large purple heart on the right", "three orange stars"]
OUT = Path(__file__).with_name("variations.png")


def main(side: int = 160) -> None:
    pipe = Pipeline.from_pretrained(DEFAULT_UNCLIP)
    rows = []
    for i, prompt in enumerate(SOURCES):
        source = render(scene_from_prompt(prompt, seed=i), 512)
        rows.append([source, *pipe(image=source, num_images_per_prompt=4, seed=i)])
    rows.append(list(pipe(PROMPTS, seed=0)))
    pad = 8
    grid = Image.new("RGB", (5 * side + 6 * pad, len(rows) * side + (len(rows) + 1) * pad), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((side, side), Image.LANCZOS), (pad + c * (side + pad), pad + r * (side + pad)))
    draw = ImageDraw.Draw(grid)
    for r in range(len(SOURCES)):   # the source column framed
        x, y = pad - 3, pad + r * (side + pad) - 3
        draw.rectangle([x, y, x + side + 5, y + side + 5], outline="black", width=2)
    grid.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
