"""`ldm` on the command line: generate writes PNGs with their parameters, help lists everything."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm import Pipeline
from ldm.cli import main as cli


def test_generate_writes_png_with_parameters(saved, tmp_path):
    model = saved["sd1"]["ldm"]
    out = tmp_path / "img.png"
    rc = cli(["generate", "a red circle", "-o", str(out), "--model", str(model), "--steps", "3",
              "--seed", "7", "--scale", "4.5", "--negative", "blurry", "--sampler", "euler", "-q"])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (32, 32)
    text = img.text
    assert text["prompt"] == "a red circle" and text["negative_prompt"] == "blurry"
    assert text["seed"] == "7" and text["steps"] == "3" and text["guidance_scale"] == "4.5"
    assert text["sampler"] == "euler" and len(text["model_hash"]) == 10
    assert text["parameters"].startswith("a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: euler")
    # the same image as the library draws with those parameters
    ref = Pipeline.from_pretrained(model)("a red circle", negative_prompt="blurry", steps=3, seed=7,
                                          guidance_scale=4.5, sampler="euler")[0]
    assert np.array_equal(np.asarray(img), np.asarray(ref))


def test_generate_several_images_numbered(saved, tmp_path):
    out = tmp_path / "batch.png"
    assert cli(["generate", "x", "-o", str(out), "--model", str(saved["sd2"]["ldm"]), "--steps", "2",
                "-n", "3", "--seed", "1", "-q"]) == 0
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["batch-00.png", "batch-01.png", "batch-02.png"]
    assert [Image.open(tmp_path / f).text["batch_index"] for f in files] == ["0", "1", "2"]


def test_generate_bad_input_is_a_clear_error(saved, tmp_path, capsys):
    rc = cli(["generate", "x", "-o", str(tmp_path / "a.png"), "--model", str(saved["sd1"]["ldm"]),
              "--height", "33", "-q"])
    assert rc == 2
    assert "height must be a positive multiple of 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert cli(["generate", "x", "--model", str(tmp_path / "missing.safetensors")]) == 2


def test_help_lists_commands_and_options():
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("generate", "convert"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "generate", "--help"], capture_output=True, text=True).stdout
    for opt in ("--model", "--steps", "--scale", "--seed", "--negative", "--sampler", "--height", "--width",
                "-n", "--device", "--dtype", "--karras"):
        assert opt in out


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_generate_in_bf16_close_to_fp32(saved, dtype):
    """Reduced precision drifts little from fp32 on the same seed."""
    fp32 = Pipeline.from_pretrained(saved["sd1"]["ldm"])("a", steps=3, seed=0, output_type="np")
    import torch
    low = Pipeline.from_pretrained(saved["sd1"]["ldm"], dtype=getattr(torch, dtype))("a", steps=3, seed=0, output_type="np")
    assert np.abs(fp32 - low).mean() < 0.03


def test_eval_generates_from_a_model_and_scores(saved, tmp_path, capsys):
    import json
    out, report = tmp_path / "imgs", tmp_path / "r.json"
    assert cli(["eval", "--model", str(saved["sd1"]["ldm"]), "--limit", "3", "--steps", "2",
                "--out", str(out), "--json", str(report), "--batch", "2"]) == 0
    result = json.loads(report.read_text())
    assert result["n"] == 3 and 0.0 <= result["overall"] <= 1.0
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 3
    assert "overall" in capsys.readouterr().out
    # the saved folder scores the same when evaluated from disk
    assert cli(["eval", "--images", str(out), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["overall"] == result["overall"]


@pytest.mark.parametrize("flags,match", [
    (["--steps", "0"], "--steps must be an integer ≥ 1, got 0"),          # ran the default steps before
    (["--scale", "-1"], "--scale must be a finite number ≥ 0"),
    (["--eta", "5", "--sampler", "ddim"], r"eta must be a number in \[0, 1\]"),
    (["--eta", "0.5", "--sampler", "euler"], "eta only applies to the ddim sampler"),
    (["--height", "-8"], "--height must be an integer ≥ 1"),
    (["--width", "0"], "--width must be an integer ≥ 1"),
    (["-n", "0"], "-n must be an integer ≥ 1"),
    (["--seed", "-5"], "--seed must be an integer"),
    (["--device", "cuda:7" if __import__("torch").cuda.is_available() else "cuda"], "CUDA|only"),
    (["--device", "tpu"], "device"),
    (["--region", "a@0,0,1,1", "--no-regions"], "contradict"),
    (["--classifier-scale", "-1"], "--classifier-scale must be a finite number ≥ 0"),
    (["--classifier", "c.safetensors"], "--classifier guides only with --classifier-scale"),
    (["--classifier-scale", "2"], "--classifier-scale with --model needs --classifier PATH"),
    (["--variations", "2"], "--variations N draws N variations of --image"),
    (["--variations", "0"], "--variations must be an integer ≥ 1"),
])
def test_generate_flags_checked_like_the_api_before_loading(tmp_path, capsys, flags, match):
    # no --model file exists: a check that ran after loading would report the missing model instead
    rc = cli(["generate", "x", "-o", str(tmp_path / "a.png"), "--model", str(tmp_path / "none.safetensors"),
              "-q", *flags])
    assert rc == 2
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err
    assert not list(tmp_path.iterdir())


def test_generate_refuses_unwritable_outputs_before_work(saved, tmp_path, capsys):
    model = str(saved["sd1"]["ldm"])
    (tmp_path / "file").write_text("")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir-01.png").mkdir()
    for out, n, match in [(tmp_path / "file" / "a.png", "3", "can't write images into"),
                          (tmp_path / "dir.png", "1", "is a folder"),
                          (tmp_path / "dir.png", "3", "dir-01.png is a folder"),
                          (tmp_path / "a.gif", "1", "write .png, .jpg or .webp")]:
        assert cli(["generate", "x", "-o", str(out), "--model", model, "-n", n, "-q"]) == 2
        assert match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir-01.png", "dir.png", "file"]


def test_generate_writes_jpeg_and_webp_by_extension(saved, tmp_path):
    model = str(saved["sd1"]["ldm"])
    for name, fmt in (("a.jpg", "JPEG"), ("b.webp", "WEBP"), ("c.PNG", "PNG")):
        assert cli(["generate", "a red circle", "-o", str(tmp_path / name), "--model", model, "--steps", "2",
                    "--seed", "4", "-q"]) == 0
        img = Image.open(tmp_path / name)
        assert img.format == fmt
        if fmt != "PNG":   # A1111's place for the parameters: EXIF UserComment
            comment = img.getexif().get_ifd(0x8769).get(0x9286) or img.getexif().get(0x9286)
            assert comment[:8] == b"UNICODE\0"
            assert comment[8:].decode("utf-16-be").startswith("a red circle\nSteps: 2")


def test_generate_many_images_in_batches(saved, tmp_path):
    model = saved["sd2"]["ldm"]
    out = tmp_path / "b.png"
    assert cli(["generate", "x", "-o", str(out), "--model", str(model), "--steps", "2", "-n", "5",
                "--batch-size", "2", "--seed", "10", "-q"]) == 0
    files = sorted(tmp_path.glob("b-*.png"))
    assert len(files) == 5
    seeds = [Image.open(f).text["seed"] for f in files]
    assert seeds == ["10", "10", "11", "11", "12"]         # batch k is seeded seed + k
    # each batch is the library's batch of that seed
    lib = Pipeline.from_pretrained(model)("x", steps=2, seed=11, num_images_per_prompt=2)
    assert np.array_equal(np.asarray(Image.open(files[3])), np.asarray(lib[1]))


def test_generate_karras_follows_the_model_unless_told(saved, tmp_path):
    model = str(saved["sd1"]["ldm"])
    for flags, sampler in ((["--sampler", "euler"], "euler"), (["--sampler", "euler", "--karras"], "euler_karras"),
                           (["--sampler", "euler", "--no-karras"], "euler")):
        out = tmp_path / "k.png"
        assert cli(["generate", "x", "-o", str(out), "--model", model, "--steps", "2", "-q", *flags]) == 0
        assert Image.open(out).text["sampler"] == sampler
