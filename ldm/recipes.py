"""Two-pass recipes on top of one `Pipeline.__call__`: outpainting (pad the canvas, inpaint the new
border) and A1111's hires fix (generate, upscale the pixels, img2img at the larger size)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .checks import as_float, as_int


def outpaint_canvas(image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    factor: int = 8) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): the image padded by the given pixels on each side, the new border filled by
    repeating the edge pixels (colours the model continues from), and the mask white there."""
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ValueError("outpaint takes an RGB PIL image (image.convert('RGB'))")
    pads = {name: as_int(v, name, 0) for name, v in dict(left=left, right=right, top=top, bottom=bottom).items()}
    if not any(pads.values()):
        raise ValueError("give at least one of left, right, top, bottom (pixels to add on that side)")
    w, h = image.size
    for name, size, (a, b) in (("width", w, ("left", "right")), ("height", h, ("top", "bottom"))):
        total = size + pads[a] + pads[b]
        if total % factor:
            more = factor - total % factor
            raise ValueError(f"the outpainted {name} {total} must be a multiple of {factor}: add {more} more "
                             f"(or {total % factor} fewer) pixels to {a}/{b}")
    spec = ((pads["top"], pads["bottom"]), (pads["left"], pads["right"]))
    canvas = np.pad(np.asarray(image), spec + ((0, 0),), mode="edge")
    mask = np.pad(np.zeros((h, w), np.uint8), spec, constant_values=255)
    return Image.fromarray(canvas), Image.fromarray(mask)


def outpaint(pipe, prompt, image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
             **kwargs):
    """The image extended by the given pixels on each side, the new border drawn for `prompt`."""
    canvas, mask = outpaint_canvas(image, left, right, top, bottom, pipe.config.autoencoder.downsample_factor)
    return pipe(prompt, image=canvas, mask_image=mask, **kwargs)


def hires(pipe, prompt, scale: float = 2.0, strength: float = 0.5, **kwargs):
    """A1111's hires fix: draw at the asked size, upscale the pixels by `scale` (Lanczos) and run
    img2img at that size with `strength`, the same seed and settings."""
    scale = as_float(scale, "hires scale", 1.0, 8.0, hint=" (the factor the first pass is upscaled by)")
    f = pipe.config.autoencoder.downsample_factor
    first = pipe(prompt, **kwargs)
    req, (w, h) = first.request, first[0].size
    big = [im.resize((round(w * scale / f) * f, round(h * scale / f) * f), Image.LANCZOS) for im in first]
    rest = {k: v for k, v in kwargs.items()
            if k not in ("negative_prompt", "height", "width", "num_images_per_prompt", "seed")}
    return pipe(req.prompts, negative_prompt=req.negatives, image=big, strength=strength, seed=req.seed, **rest)
