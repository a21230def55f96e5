"""The default model does image-conditioned generation sensibly, judged on rendered scenes by the
shape detector (issue 19): inpainting replaces the object in a masked box by the prompt's and leaves
the unmasked pixels as they were; img2img at strength 0.3 keeps the scene, at 0.8 with another
prompt it follows that prompt.

The scenes are drawn by ldm/shapes/scenes.py at the model's 512 px with known object boxes. Every call
draws several images from one seed (num_images_per_prompt) at the model's default 25 steps, and the
detector must succeed on most of them (inpainting 3 of 4, img2img 6 of 8). The success rates given at
each test were measured on the shipped model with exactly these checks over seeds 0-3 (seed 0 is the
test's); the whole file draws 24 images, 30-40 s on 2 CPU cores."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.pipeline import to_uint8
from ldm.shapes.detect import detect
from ldm.shapes.scenes import EXTENT, Scene, SceneObject, render

N, NEED = 4, 3              # inpainting: images per case, and how many of them must pass
N_I2I, NEED_I2I = 8, 6      # img2img: its per-image rate is lower (about 0.9), so more images
CELL = 32        # the default model's autoencoder factor: one latent cell is 32×32 px


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


def two_object_scene(left: tuple[str, str], right: tuple[str, str], background: str, size: int) -> Scene:
    """Large `left` = (colour, shape) centred at (0.25, 0.5) and `right` at (0.75, 0.5)."""
    return Scene(tuple(SceneObject(shape, colour, "large", 1, None, ((x, 0.5),))
                       for (colour, shape), x in ((left, 0.25), (right, 0.75))), background)


def object_box(centre: tuple[float, float], size: int, grow: int = 8) -> tuple[int, int, int, int]:
    """A large object's box (left, top, right, bottom) in px, grown by `grow` px and snapped outwards
    to the latent cells, so the mask covers whole cells and the object with its blurred edge."""
    half = EXTENT["large"] * size / 2
    (cx, cy) = (c * size for c in centre)
    lo = lambda v: max(0, math.floor((v - half - grow) / CELL) * CELL)         # noqa: E731
    hi = lambda v: min(size, math.ceil((v + half + grow) / CELL) * CELL)       # noqa: E731
    return lo(cx), lo(cy), hi(cx), hi(cy)


def box_mask(box, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)                                      # white = repaint
    return mask


def away_from(box, size: int, margin: int) -> np.ndarray:
    """Boolean (size, size): pixels at least `margin` px (Chebyshev) outside the box."""
    left, top, right, bottom = box
    yy, xx = np.mgrid[:size, :size]
    dist = np.maximum(np.maximum(left - xx, xx - (right - 1)), np.maximum(top - yy, yy - (bottom - 1)))
    return dist >= margin


def autoencoded(pipe, image: Image.Image) -> np.ndarray:
    """The picture after the autoencoder's round trip (posterior mean), float (H, W, 3) in [0, 255]."""
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return to_uint8(pipe.decode_latents(pipe.encode_image(x, sample=False)))[0].astype(np.float32)


def found(dets, colour: str, shape: str, where) -> bool:
    """A detection of this colour and shape whose centre (fractions of the image) satisfies where(cx, cy)."""
    return any(d.colour == colour and d.shape == shape and where(d.cx, d.cy) for d in dets)


def near(x: float, y: float, tol: float = 0.06):
    return lambda cx, cy: abs(cx - x) <= tol and abs(cy - y) <= tol


def summary(dets) -> list:
    return [(d.colour, d.shape, round(d.cx, 2), round(d.cy, 2)) for d in dets]


# ---------------------------------------------------------------- inpainting
# (background, kept object, replaced object, new object, side of the replaced one, prompt)
INPAINT_CASES = [
    ("light grey", ("red", "circle"), ("blue", "square"), ("green", "star"), "right",
     "a red circle to the left of a green star"),
    ("beige", ("blue", "square"), ("red", "circle"), ("purple", "triangle"), "left",
     "a blue square to the right of a purple triangle"),
]
# Pixels at least one latent cell (32 px) away from the mask are compared with the init picture's
# autoencoder round trip (posterior mean): the known latents are put back after every step, so only the
# decoder's reach (it mixes across cells) and the posterior sample move them. Measured on all 32 images
# (16 per case, seeds 0-3) with the learned ×8 upsampler: mean |Δ| 0.58-0.89, 99.9th percentile 17-18
# (of 255); the max, 66-76, sits on a kept object's edge, which a sharp ×8 moves by a whole pixel where
# the decoder's 64-px output moved it by a fraction (0.2% of the pixels differ by more than 16; with
# bicubic the max was 17). Against the original render the mean is 2.53-3.07, because the autoencoder
# itself changes the sharp edges. Redrawing the whole picture instead (img2img at strength 1 with the
# same prompt, no mask) moves these pixels by 9.1-148 on average (max > 200), so the bounds below fail
# when the known region is not kept; they leave 2.8× (mean) and 2.7× (99.9th percentile) the measured room.
KEPT_MEAN, KEPT_P999, ORIGINAL_MEAN = 2.5, 48, 4.0


@pytest.mark.parametrize("case", INPAINT_CASES, ids=lambda c: c[5].replace(" ", "_"))
def test_inpainting_replaces_the_masked_object_and_keeps_the_rest(pipe, case):
    """Measured success (the new object centred in the box, the old one nowhere and no old colour in the
    box, the other object kept at its place): 16/16 in both cases (and 8/8 seeds drawn one at a time,
    at 25 and at 15 steps). Not every pair is this easy: of six pairs tried (8 seeds each, a similar
    check) three gave 8/8, an orange heart for a green ring 5/8, a yellow cross for a cyan diamond 3/8
    and a red circle for a purple star 1/8 (mostly a purple circle: the old colour survives)."""
    background, kept, old, new, side, prompt = case
    size = pipe.config.sample_size
    assert pipe.config.autoencoder.downsample_factor == CELL     # the mask and the margin are whole cells
    scene = two_object_scene(kept, old, background, size) if side == "right" else \
        two_object_scene(old, kept, background, size)
    init = render(scene, size)
    old_x, kept_x = (0.75, 0.25) if side == "right" else (0.25, 0.75)
    box = object_box((old_x, 0.5), size)
    images = pipe(prompt, image=init, mask_image=box_mask(box, size), seed=0, num_images_per_prompt=N)

    left, top, right, bottom = (v / size for v in box)
    in_box = lambda cx, cy: left <= cx <= right and top <= cy <= bottom      # noqa: E731
    anywhere = lambda cx, cy: True                                          # noqa: E731
    passed, seen = 0, []
    for image in images:
        dets, _ = detect(image)
        seen.append(summary(dets))
        passed += (found(dets, *new, in_box) and not found(dets, *old, anywhere)
                   and not any(d.colour == old[0] and in_box(d.cx, d.cy) for d in dets)
                   and found(dets, *kept, near(kept_x, 0.5)))
    assert passed >= NEED, seen

    away = away_from(box, size, CELL)
    reference, original = autoencoded(pipe, init)[away], np.asarray(init, np.float32)[away]
    for image in images:
        out = np.asarray(image, np.float32)[away]
        diff = np.abs(out - reference)
        assert diff.mean() < KEPT_MEAN and np.percentile(diff, 99.9) < KEPT_P999, (diff.mean(), diff.max())
        assert np.abs(out - original).mean() < ORIGINAL_MEAN


# ---------------------------------------------------------------- img2img
SCENE = (("red", "circle"), ("blue", "square"), "light grey")
SAME_PROMPT = "a red circle to the left of a blue square"
NEW_PROMPT, NEW = "a red circle to the left of a green star", ("green", "star")


def test_img2img_at_low_strength_keeps_the_scene(pipe):
    """Strength 0.3 (7 of 25 steps) with the scene's own prompt: the same two objects, where they were,
    nothing else, and the same background. Measured 31/32 images (seeds 0-3, 8 each: 8, 8, 7, 8;
    4 images a seed: 28/32); the misses are the red circle drawn as another shape. The 16×16 latents
    are already noisy at t ≈ 250 (SNR ≈ 1.4): at 15 steps (4 run) it kept 2/8, and with another
    prompt 0.3 already recolours the objects (the blue square turned green in 6/8)."""
    size = pipe.config.sample_size
    left, right, background = SCENE
    init = render(two_object_scene(left, right, background, size), size)
    images = pipe(SAME_PROMPT, image=init, strength=0.3, seed=0, num_images_per_prompt=N_I2I)
    assert images.request.steps_run == 7
    passed, seen = 0, []
    for image in images:
        dets, bg = detect(image)
        seen.append((summary(dets), bg))
        passed += (len(dets) == 2 and bg == background and found(dets, *left, near(0.25, 0.5))
                   and found(dets, *right, near(0.75, 0.5)))
    assert passed >= NEED_I2I, seen


def test_img2img_at_high_strength_follows_a_new_prompt(pipe):
    """Strength 0.8 (20 of 25 steps) with a prompt that swaps the blue square for a green star: the
    star on the right, no blue square anywhere, the red circle still on the left. Measured 28/32 images
    (seeds 0-3, 8 each: 7 every seed; 4 images a seed: 29/32); the misses are the circle drawn purple
    or the star as a triangle, never the blue square kept. At 0.7 it was 23/32, at 0.5-0.6 the star
    showed in 0-2 of 8 (seed 0), so 0.8 is where this model follows a new prompt."""
    size = pipe.config.sample_size
    left, right, background = SCENE
    init = render(two_object_scene(left, right, background, size), size)
    images = pipe(NEW_PROMPT, image=init, strength=0.8, seed=0, num_images_per_prompt=N_I2I)
    assert images.request.steps_run == 20
    passed, seen = 0, []
    for image in images:
        dets, _ = detect(image)
        seen.append(summary(dets))
        passed += (found(dets, *NEW, lambda cx, cy: cx > 0.5) and not found(dets, *right, lambda cx, cy: True)
                   and found(dets, *left, lambda cx, cy: cx < 0.5))
    assert passed >= NEED_I2I, seen


# ---------------------------------------------------------------- variations (issue 20)
# Measured on these 4 scenes (seed 0, 2 variations each): CLIP image cosine to their own source 0.748,
# to the other sources -0.105 (bench/unclip_default.py, 50 sources × 4: 0.735 / 0.115). The floors
# leave 0.25 of room; an adapter that ignored the image would give own ≈ other.
VARIATION_OWN_MIN, VARIATION_GAP_MIN = 0.5, 0.6
VARIATION_SOURCES = ["a red star", "a blue ring on a beige background", "a green heart on the left",
                     "two yellow squares"]


def test_variations_resemble_their_source_more_than_the_others(pipe):
    """`ldm generate --image scene.png --variations N` with the default model: each variation's CLIP image
    embedding (the model's own image tower) is nearer its source's than the other sources'."""
    import torch.nn.functional as F
    from ldm.shapes.scenes import scene_from_prompt
    sources = [render(scene_from_prompt(p, seed=0), pipe.config.sample_size) for p in VARIATION_SOURCES]
    drawn = [pipe(image=s, num_images_per_prompt=2, seed=0) for s in sources]
    assert all(im.request.prompts == ["", ""] for im in drawn)
    src = F.normalize(pipe.encode_image_embedding(sources).float(), dim=-1)                   # (4, D)
    var = F.normalize(pipe.encode_image_embedding([im for row in drawn for im in row]).float(), dim=-1)
    cos = var @ src.T                                                                          # (8, 4)
    own = cos[torch.arange(8), torch.arange(8) // 2]
    other = (cos.sum(1) - own) / 3
    assert own.mean() >= VARIATION_OWN_MIN and own.mean() - other.mean() >= VARIATION_GAP_MIN, (own, other)
    assert (own > other).all(), (own, other)
