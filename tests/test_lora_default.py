"""The shape-world LoRA shipped in weights/loras/beige.safetensors (configs/train_lora_beige.yaml, data
and picture by docs/make_lora_example.py): on the default model it puts every scene on a beige
background, whichever one the seed would have given, while the prompted objects are still drawn and
found; unloaded, the pictures are the base model's bit for bit."""
from pathlib import Path

import numpy as np
import pytest

from ldm import Pipeline
from ldm.shapes.adherence import score
from ldm.shapes.detect import background_colour, nearest_background, to_array
from ldm.shapes.prompts import BACKGROUNDS

LORA = Path(__file__).resolve().parent.parent / "weights" / "loras" / "beige.safetensors"
BEIGE = np.array(BACKGROUNDS["beige"])
# no background named, so the seed chooses one; none of these captions is in the LoRA's training data
PROMPTS = ["a small red square on the right", "two yellow squares", "a green star on the left",
           "a blue diamond at the bottom", "a purple cross above an orange heart", "three pink rings"]
STEPS = 12


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


def _backgrounds(images) -> tuple[np.ndarray, list[str]]:
    """Each picture's background (median of its border): RGB distance from beige, and its name."""
    rgb = [background_colour(to_array(im)) for im in images]
    return np.array([np.linalg.norm(c - BEIGE) for c in rgb]), [nearest_background(c) for c in rgb]


def test_beige_lora_changes_the_background_and_keeps_the_objects(pipe):
    assert LORA.stat().st_size < 1.5 * 2 ** 20
    base = pipe(PROMPTS, seed=0, steps=STEPS)
    assert pipe.load_lora(LORA) == "beige"
    styled = pipe(PROMPTS, seed=0, steps=STEPS)
    pipe.unload_lora()
    again = pipe(PROMPTS, seed=0, steps=STEPS)

    (before, names_before), (after, names_after) = _backgrounds(base), _backgrounds(styled)
    found = [[score(im, p)["correct"] for im, p in zip(images, PROMPTS)] for images in (base, styled)]
    print(f"background distance from beige: base {before.round(1)} {names_before}, LoRA {after.round(1)}; "
          f"prompts followed: base {sum(found[0])}/{len(PROMPTS)}, LoRA {sum(found[1])}/{len(PROMPTS)}")
    assert names_before.count("beige") <= 1 and before.mean() > 100   # the seeds give other backgrounds
    assert names_after == ["beige"] * len(PROMPTS) and after.max() < 20
    assert sum(found[1]) >= sum(found[0]) - 1                          # the objects are still drawn as prompted
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, again))   # unloaded: bit for bit
