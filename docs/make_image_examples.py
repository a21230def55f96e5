"""docs/image_examples.png: img2img, inpainting, outpainting and upscaling by the default model, each as
an input | output pair, on scenes rendered by ldm/shapes/scenes.py (the model's world). The upscale is
the default model's own learned ×8 (its autoencoder's upsampler), shown 1:1 on a crop: the network's
64-px output, each pixel drawn 8×8, against the 512-px image.

    python docs/make_image_examples.py [--inputs DIR]

It prints the calls (and the equivalent `ldm` commands) that made each picture; --inputs DIR also
writes the input pictures and the mask there, so the commands can be run as printed. (The SD ×4
upscaler needs an x4 upscaler model, which this project does not ship.)"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import ldm
import ldm.pipeline
from ldm.recipes import outpaint_canvas
from ldm.shapes.scenes import EXTENT, Scene, SceneObject, render

SEED = 0          # every example; seeds 0-7 all give the prompt's objects (checked with ldm/shapes/detect.py)
TILE = 256        # tile height in the strip (the model draws 512 px)
IMG2IMG = dict(prompt="a pink heart on a navy background", strength=0.6)
INPAINT = dict(prompt="a red circle to the left of a green star")
OUTPAINT = dict(prompt="a red circle to the left of a blue square", right=256)
UPSCALE = dict(prompt="three yellow stars", box=(16, 8, 48, 40))   # the crop, in 64-px decoder pixels


def obj(shape: str, colour: str, x: float, y: float = 0.5) -> SceneObject:
    return SceneObject(shape, colour, "large", 1, None, ((x, y),))


def cell_box(x: float, y: float, size: int, factor: int, grow: int = 8) -> tuple[int, int, int, int]:
    """A large object's box at (x, y) (fractions), grown by `grow` px and snapped out to whole latent cells."""
    half = EXTENT["large"] * size / 2
    lo = lambda v: max(0, math.floor((v * size - half - grow) / factor) * factor)     # noqa: E731
    hi = lambda v: min(size, math.ceil((v * size + half + grow) / factor) * factor)   # noqa: E731
    return lo(x), lo(y), hi(x), hi(y)


def show_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture with the area to repaint (white in the mask) washed out and outlined."""
    wash = Image.blend(image, Image.new("RGB", image.size, "white"), 0.6)
    out = Image.composite(wash, image, mask)
    left, top, right, bottom = mask.getbbox()
    ImageDraw.Draw(out).rectangle((left, top, right - 1, bottom - 1), outline=(230, 0, 0), width=4)
    return out


def strip(pairs, font) -> Image.Image:
    """One row of (input, output, caption lines) pairs, TILE px high, captions below."""
    gap, pad, line = 24, 6, font.size + 4
    n_lines = max(len(c) for *_, c in pairs)
    tiles = [[im.resize((round(im.width * TILE / im.height), TILE), Image.Resampling.LANCZOS) for im in (a, b)]
             for a, b, _ in pairs]
    width = sum(a.width + b.width + pad for a, b in tiles) + gap * (len(pairs) - 1)
    canvas = Image.new("RGB", (width, TILE + pad + n_lines * line + pad), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for (a, b), (_, _, caption) in zip(tiles, pairs):
        canvas.paste(a, (x, 0))
        canvas.paste(b, (x + a.width + pad, 0))
        for k, text in enumerate(caption):
            draw.text((x + 2, TILE + pad + k * line), text, fill="black", font=font)
        x += a.width + b.width + pad + gap
    return canvas


def main(inputs: Path | None = None):
    pipe = ldm.Pipeline.from_pretrained()
    size, f = pipe.config.sample_size, pipe.config.autoencoder.downsample_factor

    star = render(Scene((obj("star", "yellow", 0.5),), "navy"), size)
    a = pipe(IMG2IMG["prompt"], image=star, strength=IMG2IMG["strength"], seed=SEED)[0]

    two = render(Scene((obj("circle", "red", 0.25), obj("square", "blue", 0.75)), "light grey"), size)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, cell_box(0.75, 0.5, size, f))                                   # white = repaint
    b = pipe(INPAINT["prompt"], image=two, mask_image=mask, seed=SEED)[0]

    circle = render(Scene((obj("circle", "red", 0.5),), "beige"), size)
    c = ldm.outpaint(pipe, OUTPAINT["prompt"], circle, right=OUTPAINT["right"], seed=SEED)[0]
    canvas, border = outpaint_canvas(circle, right=OUTPAINT["right"], factor=f)
    assert c.size == canvas.size and c.width % f == 0

    z = pipe(UPSCALE["prompt"], seed=SEED, output_type="latent")
    vae, k = pipe.model.first_stage_model, pipe.config.autoencoder.pixel_scale
    with torch.no_grad():
        low = vae.decode(z / pipe.config.autoencoder.scale_factor, resample=False).clamp(-1, 1)
    low, big = ldm.pipeline.to_pil(low)[0], ldm.pipeline.to_pil(pipe.decode_latents(z))[0]
    crop = UPSCALE["box"]
    d_in = low.crop(crop).resize(((crop[2] - crop[0]) * k, (crop[3] - crop[1]) * k), Image.Resampling.NEAREST)
    d_out = big.crop(tuple(v * k for v in crop))

    font = ImageFont.load_default(size=13)
    steps = pipe.config.default_steps
    picture = strip([
        (star, a, ["img2img: rendered scene ->", f'"{IMG2IMG["prompt"]}"',
                   f"strength {IMG2IMG['strength']}, seed {SEED} ({a.info['steps_run']} of {steps} steps)"]),
        (show_mask(two, mask), b, ["inpaint: the boxed object ->", f'"{INPAINT["prompt"]}"',
                                   f"mask {mask.getbbox()}, seed {SEED}"]),
        (show_mask(canvas, border), c, [f"outpaint: {size}x{size} + {OUTPAINT['right']} px on the right ->",
                                        f'"{OUTPAINT["prompt"]}"', f"{c.width}x{c.height}, seed {SEED}"]),
        (d_in, d_out, [f"upscale x{k}: the network's {low.width} px (crop) ->", "the learned x8 (autoencoder.upsampler)",
                       f'"{UPSCALE["prompt"]}", seed {SEED}, 1:1']),
    ], font)
    out = Path(__file__).resolve().parent / "image_examples.png"
    picture.save(out, optimize=True)
    print(f"{out}: {picture.width}x{picture.height}, {out.stat().st_size // 1024} KB")

    d = inputs or Path("IN")
    if inputs is not None:
        inputs.mkdir(parents=True, exist_ok=True)
        for name, im in (("star", star), ("two", two), ("mask", mask), ("circle", circle)):
            im.save(d / f"{name}.png")
    s = pipe.config
    print(f"\nDefault model, its defaults: {s.default_sampler}, {steps} steps, guidance {s.default_guidance_scale}, "
          f"layout planner {s.layout_planner!r} (regions on); inputs drawn by ldm.shapes.scenes.render at {size} px.")
    print(f"""
pipe = ldm.Pipeline.from_pretrained()
# img2img: {d}/star.png = a large yellow star at the centre, navy background
pipe("{IMG2IMG['prompt']}", image=star, strength={IMG2IMG['strength']}, seed={SEED})
# inpainting: {d}/two.png = a red circle at x 0.25, a blue square at x 0.75, light grey;
#             {d}/mask.png = white on {mask.getbbox()} (the square's box, whole {f} px cells)
pipe("{INPAINT['prompt']}", image=two, mask_image=mask, seed={SEED})
# outpainting: {d}/circle.png = a red circle at the centre, beige; the canvas grows to {c.width}x{c.height}
ldm.outpaint(pipe, "{OUTPAINT['prompt']}", circle, right={OUTPAINT['right']}, seed={SEED})

ldm generate "{IMG2IMG['prompt']}" --image {d}/star.png --strength {IMG2IMG['strength']} --seed {SEED} -o img2img.png
ldm generate "{INPAINT['prompt']}" --image {d}/two.png --mask {d}/mask.png --seed {SEED} -o inpaint.png
ldm outpaint {d}/circle.png "{OUTPAINT['prompt']}" --right {OUTPAINT['right']} --seed {SEED} -o outpaint.png""")
    print(f"# upscaling: every ldm generate by the default model ends in its learned x{k} (64 -> 512 px)")
    return dict(img2img=a, inpaint=b, outpaint=c, upscale=big)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, help="also write the input pictures and the mask here")
    main(parser.parse_args().inputs)
