"""docs/gallery.png: one image per prompt from the default model, at its default settings.

    python docs/make_gallery.py"""
from pathlib import Path

from PIL import Image, ImageDraw

from ldm import Pipeline

PROMPTS = [
    "a red circle on the left", "two blue squares", "three yellow stars", "a green heart at the top",
    "a purple triangle to the right of an orange ring", "a pink diamond below a cyan cross",
    "a large brown square", "a small blue circle in the centre",
    "a red star on a beige background", "two green circles and a blue ring", "an orange cross at the bottom",
    "a yellow heart above a purple square",
]


def main(size: int = 256):
    pipe = Pipeline.from_pretrained()
    images = pipe(PROMPTS, seed=0)
    cols, label = 4, 28
    grid = Image.new("RGB", (cols * size, (len(PROMPTS) // cols) * (size + label)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, p) in enumerate(zip(images, PROMPTS)):
        x, y = (i % cols) * size, (i // cols) * (size + label)
        grid.paste(im.resize((size, size), Image.Resampling.LANCZOS), (x, y))
        draw.text((x + 4, y + size + 6), p[:44], fill="black")
    out = Path(__file__).resolve().parent / "gallery.png"
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main()
