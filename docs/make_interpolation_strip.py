"""docs/interpolation.png: the default model walking from one prompt and seed to another
(`Pipeline.interpolate`, ldm/interpolate.py), 8 frames, layout planner off so the walk is smooth."""
from pathlib import Path

from PIL import Image

from ldm import Pipeline

A, B = "a red circle to the left of a blue square", "a green star above a yellow heart"
OUT = Path(__file__).with_name("interpolation.png")


def main(frames: int = 8, side: int = 192) -> None:
    pipe = Pipeline.from_pretrained()
    walk = pipe.interpolate([A, B], seeds=[1, 2], frames=frames, regions=None)
    strip = Image.new("RGB", (side * frames, side), "white")
    for i, frame in enumerate(walk):
        strip.paste(frame.resize((side, side), Image.LANCZOS), (i * side, 0))
    strip.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
