"""The model shipped in weights/: it loads with no path, fits the size budget, is self-describing,
and draws reproducible 512×512 pictures through the library and the command line."""
import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.cli import main as cli
from ldm.shapes.scenes import render, scene_from_prompt
from ldm.shapes.adherence import evaluate, load_prompts
from ldm.shapes.eval_cli import PROMPTS, seeded_latents
from ldm.pipeline import default_model_path, to_pil


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


def test_default_model_is_one_small_self_describing_file(pipe):
    path = default_model_path()
    assert path.stat().st_size <= 40 * 2 ** 20          # with its ×8 upsampler and its variations' parts (issues 19, 20)
    assert pipe.config.autoencoder.upsampler_channels and pipe.config.image_adapter is not None
    assert pipe.source == str(path) and pipe.config.sample_size == 512
    assert pipe.config.autoencoder.downsample_factor == 32 and pipe.config.latent_size == 16


def test_draws_reproducible_512px_images(pipe):
    a = pipe(["a red circle", "two blue squares"], seed=0, steps=5)
    b = pipe(["a red circle", "two blue squares"], seed=0, steps=5)
    assert [im.size for im in a] == [(512, 512)] * 2
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # the prompt changes the picture
    assert np.asarray(a[0]).std() > 5                                # not a flat field


def test_cli_uses_the_default_model(tmp_path):
    out = tmp_path / "x.png"
    assert cli(["generate", "a green star", "-o", str(out), "--steps", "3", "--seed", "1", "-q"]) == 0
    from PIL import Image
    img = Image.open(out)
    assert img.size == (512, 512) and img.text["model"] == default_model_path().name


def test_evaluator_holds_on_the_shipped_autoencoders_reconstructions(pipe):
    """Issue 5's trust condition: >= 95% on autoencoder reconstructions of held-out prompts' renders."""
    prompts = load_prompts(PROMPTS)[::2]  # 125 prompts, 25 per category
    images = []
    for i in range(0, len(prompts), 25):
        x = torch.stack([torch.from_numpy(np.asarray(render(scene_from_prompt(p, seed=i + j), 512), np.float32))
                         for j, p in enumerate(prompts[i:i + 25])]).permute(0, 3, 1, 2) / 127.5 - 1
        rec = pipe.decode_latents(pipe.encode_image(x, sample=False))                  # (25, 3, 512, 512)
        images += to_pil(rec)
    result = evaluate(images, prompts)
    assert result["overall"] >= 0.95, {k: v["accuracy"] for k, v in result["categories"].items()}
    assert min(c["accuracy"] for c in result["categories"].values()) >= 0.90


# Measured on these 50 prompts and seeds: overall 0.86, single objects 1.0, named backgrounds 1.0,
# two objects 0.7 with the planned regions and 0.0 without them (`regions=None`: overall 0.72;
# docs/default_model.md has the full 250-prompt report). The floors sit 4, 2, 2 and 2 images below, so
# a regression in the model, the samplers, the pipeline or the layout planner fails; the background
# one guards the offset-noise fix (before it the seed, not the prompt, chose the background: 0.4).
ADHERENCE_FLOOR, SINGLE_FLOOR, BACKGROUND_FLOOR, TWO_OBJECT_FLOOR = 0.78, 0.8, 0.8, 0.5


def test_shipped_model_follows_prompts(pipe):
    prompts = load_prompts(PROMPTS)[::5]  # 50 prompts, 10 per category, one image each at default settings
    images = []
    for i in range(0, len(prompts), 25):
        images += pipe(prompts[i:i + 25], latents=seeded_latents(pipe.config, range(i, i + 25)))
    result = evaluate(images, prompts)
    accuracy = {k: v["accuracy"] for k, v in result["categories"].items()}
    assert result["overall"] >= ADHERENCE_FLOOR and accuracy["single"] >= SINGLE_FLOOR, accuracy
    assert accuracy["colour"] >= BACKGROUND_FLOOR and accuracy["two_objects"] >= TWO_OBJECT_FLOOR, accuracy
    planned = [im.info["regions"] for im, r in zip(images, result["results"]) if r["category"] == "two_objects"]
    assert pipe.config.layout_planner == "scenes" and all(len(r) == 2 for r in planned)
