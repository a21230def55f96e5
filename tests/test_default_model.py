"""The model shipped in weights/: it loads with no path, fits the size budget, is self-describing,
and draws reproducible 512×512 pictures through the library and the command line."""
import numpy as np
import pytest

from ldm import Pipeline
from ldm.cli import main as cli
from ldm.pipeline import default_model_path


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


def test_default_model_is_one_small_self_describing_file(pipe):
    path = default_model_path()
    assert path.stat().st_size <= 30 * 2 ** 20
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
