"""`ldm generate --image/--mask/--hires`, `ldm upscale`, `ldm outpaint`: the library's images, with
A1111's img2img fields in the PNG; bad input refused before the model loads."""
import re

import numpy as np
import pytest
from PIL import Image

from ldm import Pipeline, outpaint
from ldm.cli import main as cli
from ldm.recipes import outpaint_canvas
from test_image_conditioning import left_half_mask, picture
from tiny_models import random_model, tiny_upscaler


@pytest.fixture
def files(tmp_path):
    picture(0).save(tmp_path / "in.png")
    left_half_mask().save(tmp_path / "mask.png")
    return tmp_path


def test_img2img_and_inpainting_from_the_command_line(saved, files):
    model = saved["sd1"]["ldm"]
    base = ["--model", str(model), "--steps", "6", "--seed", "3", "--no-regions", "-q"]
    assert cli(["generate", "a cat", "--image", str(files / "in.png"), "--strength", "0.5",
                "-o", str(files / "i2i.png")] + base) == 0
    assert cli(["generate", "a cat", "--image", str(files / "in.png"), "--mask", str(files / "mask.png"),
                "-o", str(files / "inp.png")] + base) == 0
    pipe = Pipeline.from_pretrained(model)
    i2i, inp = Image.open(files / "i2i.png"), Image.open(files / "inp.png")
    assert "Denoising strength: 0.5, Steps run: 3" in i2i.text["parameters"] and i2i.text["strength"] == "0.5"
    assert "Denoising strength: 1.0, Steps run: 6" in inp.text["parameters"]
    kw = dict(steps=6, seed=3, regions=None)
    assert np.array_equal(np.asarray(i2i), np.asarray(pipe("a cat", image=picture(0), strength=0.5, **kw)[0]))
    assert np.array_equal(np.asarray(inp), np.asarray(pipe("a cat", image=picture(0), mask_image=left_half_mask(),
                                                           **kw)[0]))


def test_hires_fix_doubles_the_size_and_says_so(saved, files):
    out = files / "hires.png"
    assert cli(["generate", "a cat", "--model", str(saved["sd1"]["ldm"]), "--steps", "4", "--seed", "1",
                "--hires", "2", "--hires-strength", "0.5", "-o", str(out), "-q"]) == 0
    im = Image.open(out)
    assert im.size == (64, 64) and "Hires upscale: 2.0" in im.text["parameters"]


def test_outpaint_pads_and_keeps_the_size_a_multiple_of_the_factor(saved, files):
    canvas, mask = outpaint_canvas(picture(0), left=4, top=2, factor=2)
    assert canvas.size == (36, 34) and np.asarray(mask)[2:, 4:].max() == 0 and np.asarray(mask)[:2].min() == 255
    assert np.array_equal(np.asarray(canvas)[2:, 4:], np.asarray(picture(0)))
    with pytest.raises(ValueError, match="must be a multiple of 2: add 1 more"):
        outpaint_canvas(picture(0), right=3, factor=2)
    pipe = saved["sd1"]["pipe"]
    wide = outpaint(pipe, "a cat", picture(0), right=8, steps=3, seed=0)
    assert wide[0].size == (40, 32)
    out = files / "out.png"
    assert cli(["outpaint", str(files / "in.png"), "a cat", "--right", "8", "--model", str(saved["sd1"]["ldm"]),
                "--steps", "3", "--seed", "0", "-o", str(out), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(wide[0]))


def test_upscale_command(tmp_path):
    folder = tmp_path / "x4"
    Pipeline(random_model(tiny_upscaler())).save_pretrained(folder, "diffusers")
    picture(1, (16, 12)).save(tmp_path / "low.png")
    out = tmp_path / "big.png"
    assert cli(["upscale", str(tmp_path / "low.png"), "--model", str(folder), "--prompt", "a cat",
                "--noise-level", "30", "--steps", "3", "--seed", "0", "-o", str(out), "-q"]) == 0
    im = Image.open(out)
    assert im.size == (64, 48) and "Noise level: 30" in im.text["parameters"]


@pytest.mark.parametrize("argv,match", [
    (["generate", "x", "--mask", "m.png"], "--mask needs --image"),
    (["generate", "x", "--image", "missing.png"], "--image missing.png: can't read it"),
    (["generate", "x", "--image", "in.png", "--strength", "0"], r"--strength must be a finite number in"),
    (["generate", "x", "--image", "in.png", "--hires", "2"], "--hires is for text-to-image"),
    (["upscale", "missing.png"], "input missing.png: can't read it"),
])
def test_bad_image_flags_refused_before_the_model_loads(files, argv, match, capsys, monkeypatch):
    monkeypatch.chdir(files)
    monkeypatch.setattr(Pipeline, "from_pretrained", None)     # loading would fail differently
    assert cli(argv + ["-o", str(files / "o.png")]) == 2
    assert re.search(match, capsys.readouterr().err)
