"""Interpolation: the ends are the plain calls' images bit for bit (text, variation and unCLIP models, an
ancestral sampler included), the frames between move between them, slerp's own properties, and
`ldm interpolate` writing the frames and an animated GIF atomically."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.interpolate import slerp
from tiny_models import random_model, tiny_unclip, tiny_variation
from test_variations import photo


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_slerp_ends_exact_and_norm_kept():
    a, b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    a, b = a[None], b[None]
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    low = min(a.norm(), b.norm())
    assert mid.norm() > 0.95 * low                         # Gaussian noise stays on its shell; lerp shrinks it
    assert (0.5 * (a + b)).norm() < 0.8 * low
    assert torch.allclose(slerp(a, a * 2, 0.5), a * 1.5, atol=1e-6)   # parallel rows: lerp


def test_text_interpolation_ends_are_the_plain_calls(saved):
    pipe = saved["sd1"]["pipe"]
    kw = dict(steps=3, sampler="euler_ancestral", guidance_scale=5.0)
    frames = pipe.interpolate(["a red circle", "two blue squares"], seeds=[3, 9], frames=4, **kw)
    first, last = pipe("a red circle", seed=3, **kw)[0], pipe("two blue squares", seed=9, **kw)[0]
    assert len(frames) == 4
    assert np.array_equal(pixels(frames[0]), pixels(first)) and np.array_equal(pixels(frames[-1]), pixels(last))
    gap = lambda x, y: np.abs(pixels(x) - pixels(y)).mean()      # noqa: E731
    assert gap(frames[1], first) > 1 and gap(frames[1], first) < gap(frames[-1], first)


@pytest.mark.parametrize("make,kw", [(tiny_variation, {}), (tiny_unclip, dict(noise_level=40))])
def test_image_embedding_interpolation_ends_are_the_plain_calls(make, kw):
    pipe = Pipeline(random_model(make()))
    prompts = None if pipe.config.text_encoder is None else ["a cat", "a dog"]
    frames = pipe.interpolate(prompts, seeds=[1, 2], frames=3, images=[photo(0), photo(6)], steps=3, **kw)
    text = (lambda p: dict(prompt=p)) if prompts else (lambda p: {})
    first = pipe(image=photo(0), seed=1, steps=3, **text("a cat"), **kw)[0]
    last = pipe(image=photo(6), seed=2, steps=3, **text("a dog"), **kw)[0]
    assert np.array_equal(pixels(frames[0]), pixels(first)) and np.array_equal(pixels(frames[-1]), pixels(last))
    assert np.abs(pixels(frames[1]) - pixels(first)).mean() > 0.5


def test_interpolate_refuses_bad_arguments(saved):
    pipe = saved["sd1"]["pipe"]
    with pytest.raises(ValueError, match="frames must be an integer >= 2"):
        pipe.interpolate(["a", "b"], frames=1)
    with pytest.raises(ValueError, match="seeds must be two seeds"):
        pipe.interpolate(["a", "b"], seeds=[1])
    with pytest.raises(ValueError, match="prompts must be a list of two"):
        pipe.interpolate(["a"])
    with pytest.raises(TypeError, match="takes no strength"):
        pipe.interpolate(["a", "b"], strength=0.5)


def test_cli_writes_frames_and_an_animated_gif(saved, tmp_path, monkeypatch):
    from ldm import cli
    out = tmp_path / "walk.gif"
    cli.main(["interpolate", "a red circle", "a green star", "--seeds", "1", "2", "--frames", "3", "--steps", "2",
              "--model", str(saved["sd1"]["ldm"]), "-o", str(out)])
    gif = Image.open(out)
    assert gif.n_frames == 3 and gif.size == (32, 32)
    pngs = sorted(tmp_path.glob("walk-*.png"))
    assert [p.name for p in pngs] == ["walk-000.png", "walk-001.png", "walk-002.png"]
    plain = Pipeline.from_pretrained(saved["sd1"]["ldm"])("a red circle", seed=1, steps=2)[0]
    assert np.array_equal(pixels(Image.open(pngs[0])), pixels(plain))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary files left
