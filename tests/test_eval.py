"""Prompt-adherence evaluator: parser, detector, and its validation on ground-truth renders of the
fixed eval prompts (clean 64/512 px, degraded like an autoencoder reconstruction, wrong images)."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.shapes.scenes import render, scene_from_prompt, write_imagefolder
from ldm.shapes import eval_cli as cli
from ldm.shapes.adherence import evaluate, load_prompts, score
from ldm.shapes.detect import detect, label
from ldm.shapes.prompts import ObjectSpec, PromptSpec, parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(ROOT / "configs" / "eval_prompts.txt")


def degrade(img: Image.Image, seed: int, factor: int = 4, jpeg: int | None = None) -> Image.Image:
    """Imitation of an autoencoder reconstruction: down x4 + up, Gaussian blur 1, noise 8/255."""
    s = img.size[0]
    img = img.resize((s // factor,) * 2, Image.BICUBIC).resize((s, s), Image.BICUBIC)
    img = img.filter(ImageFilter.GaussianBlur(1))
    arr = np.asarray(img, np.float32) + np.random.default_rng(seed).normal(0, 8, (s, s, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def _accuracy(prompts, images):
    result = evaluate(images, prompts)
    fails = [(r["prompt"], r["reason"]) for r in result["results"] if not r["correct"]][:5]
    return result, fails


O = ObjectSpec
PHRASINGS = [
    ("a red circle", PromptSpec((O("circle", "red"),))),
    ("A picture of a red circle on the left.", PromptSpec((O("circle", "red", position="left"),))),
    ("on the left, a red circle", PromptSpec((O("circle", "red", position="left"),))),
    ("a red circle on the left side of the image",
     PromptSpec((O("circle", "red", position="left"),))),
    ("a circle that is red, in the center", PromptSpec((O("circle", "red", position="centre"),))),
    ("a small circle coloured red in the middle",
     PromptSpec((O("circle", "red", size="small", position="centre"),))),
    ("There are three big green hearts near the top",
     PromptSpec((O("heart", "green", 3, "large", "top"),))),
    ("2 Blue Stars", PromptSpec((O("star", "blue", 2),))),
    ("a pair of pink squares", PromptSpec((O("square", "pink", 2),))),
    ("a violet diamond against a beige backdrop",
     PromptSpec((O("diamond", "purple"),), None, "beige")),
    ("an orange ring, dark gray background", PromptSpec((O("ring", "orange"),), None, "dark grey")),
    ("a yellow star on a navy blue background", PromptSpec((O("star", "yellow"),), None, "navy")),
    ("a red circle to the left of a blue square",
     PromptSpec((O("circle", "red"), O("square", "blue")), "left_of")),
    ("a blue square is to the right of a red circle",
     PromptSpec((O("circle", "red"), O("square", "blue")), "left_of")),
    ("a red circle left of a blue square",
     PromptSpec((O("circle", "red"), O("square", "blue")), "left_of")),
    ("a cyan cross above a brown ring",
     PromptSpec((O("cross", "cyan"), O("ring", "brown")), "above")),
    ("a brown ring underneath a cyan cross",
     PromptSpec((O("cross", "cyan"), O("ring", "brown")), "above")),
    ("a brown ring beneath one cyan plus on a light gray backdrop",
     PromptSpec((O("cross", "cyan"), O("ring", "brown")), "above", "light grey")),
    ("a red circle and a blue square", PromptSpec((O("circle", "red"), O("square", "blue")))),
    ("a blue square with a red circle", PromptSpec((O("circle", "red"), O("square", "blue")))),
    ("a red circle on the left and a blue square on the right",
     PromptSpec((O("circle", "red", position="left"), O("square", "blue", position="right")))),
    ("a drawing of a single large purple triangle at the bottom of the picture",
     PromptSpec((O("triangle", "purple", size="large", position="bottom"),))),
]


@pytest.mark.parametrize("text,expected", PHRASINGS)
def test_parser_phrasings(text, expected):
    assert parse(text).canonical() == expected.canonical()


@pytest.mark.parametrize("text,category", [
    ("a red circle", "single"), ("a red circle on a beige background", "colour"),
    ("a red circle at the top", "position"), ("three red circles", "counting"),
    ("a red circle and a blue star", "two_objects"),
    ("a red circle above a blue star", "two_objects")])
def test_categories(text, category):
    assert parse(text).category == category


@pytest.mark.parametrize("text", ["", "a red hexagon", "a red circle left of",
                                  "a red circle on a white background",
                                  "a red circle on the left at the right"])
def test_parser_errors(text):
    with pytest.raises(ValueError):
        parse(text)


def test_label_matches_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((int(rng.integers(1, 16)), int(rng.integers(1, 16)))) < rng.random()
        labels, n = label(mask)
        ref, seen = 0, np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            ref += 1
            stack = [(y, x)]
            seen[y, x] = True
            while stack:
                a, b = stack.pop()
                for u in range(max(a - 1, 0), min(a + 2, mask.shape[0])):
                    for v in range(max(b - 1, 0), min(b + 2, mask.shape[1])):
                        if mask[u, v] and not seen[u, v]:
                            seen[u, v] = True
                            stack.append((u, v))
        assert n == ref
        assert len(set(zip(labels[mask].tolist(), range(mask.sum())))) >= n
        assert (labels > 0).sum() == mask.sum()


def test_detect_simple_scene():
    dets, bg = detect(render(scene_from_prompt("a large red star to the left of a small blue ring "
                                               "on a navy background"), 64))
    assert bg == "navy"
    got = {(d.size, d.colour, d.shape) for d in dets}
    assert got == {("large", "red", "star"), ("small", "blue", "ring")}


def test_ground_truth_64px(prompts):
    result, fails = _accuracy(prompts, [render(scene_from_prompt(p), 64) for p in prompts])
    assert result["overall"] >= 0.98, fails
    assert min(c["accuracy"] for c in result["categories"].values()) >= 0.95, fails


def test_ground_truth_512px(prompts):
    subset = prompts[::2]  # 125 prompts, 25 per category (rendering at 512 px costs ~40 ms each)
    result, fails = _accuracy(subset, [render(scene_from_prompt(p), 512) for p in subset])
    assert result["overall"] >= 0.98, fails


def test_degraded_like_autoencoder_256px(prompts):
    images = [degrade(render(scene_from_prompt(p), 256), i) for i, p in enumerate(prompts)]
    result, fails = _accuracy(prompts, images)
    assert result["overall"] >= 0.95, fails


def test_degraded_at_64px_blur_noise_jpeg(prompts):
    """At 64 px: down x2 + up, blur 1, noise 8/255, then JPEG q85."""
    images = [degrade(render(scene_from_prompt(p), 64), i, factor=2, jpeg=85)
              for i, p in enumerate(prompts)]
    result, fails = _accuracy(prompts, images)
    assert result["overall"] >= 0.90, fails


def test_small_noise_blobs_are_ignored():
    prompt = "two green triangles at the bottom"
    arr = np.array(render(scene_from_prompt(prompt), 64))
    rng = np.random.default_rng(1)
    for y, x in rng.integers(0, 62, (12, 2)):
        arr[y:y + 2, x:x + 2] = rng.integers(0, 256, 3)
    assert score(Image.fromarray(arr), prompt)["correct"]


def test_wrong_images_score_low(prompts):
    """A render of another prompt of the same category rarely satisfies the true prompt."""
    by_cat = {}
    for p in prompts:
        by_cat.setdefault(parse(p).category, []).append(p)
    truth, images = [], []
    for group in by_cat.values():
        for j, p in enumerate(group):
            truth.append(p)
            images.append(render(scene_from_prompt(group[(j + 1) % len(group)]), 64))
    assert evaluate(images, truth)["overall"] <= 0.10


@pytest.mark.parametrize("shown,asked", [
    ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
    ("a red circle above a blue square", "a blue square above a red circle"),
    ("two red circles", "three red circles"),
    ("three red circles", "two red circles"),
    ("a red circle", "a blue circle"),
    ("a red circle", "a red ring"),
    ("a red circle on the left", "a red circle on the right"),
    ("a red circle on a beige background", "a red circle on a navy background"),
    ("a large red circle", "a small red circle"),
    ("a red circle and a blue square", "a blue circle and a red square"),
])
def test_hard_negatives_fail(shown, asked):
    image = render(scene_from_prompt(shown), 64)
    assert score(image, shown)["correct"]
    assert not score(image, asked)["correct"]


def test_colour_swap_between_two_objects_is_named():
    image = render(scene_from_prompt("a blue circle above a red square"), 64)
    result = score(image, "a red circle above a blue square")
    assert not result["correct"] and result["reason"] == "colours swapped: blue circle and red square"
    # any other miss keeps its plain reason
    assert score(image, "a red star above a blue square")["reason"].startswith("found 0 x red star")


def test_evaluate_output_and_errors():
    images = [render(scene_from_prompt(p), 64) for p in ("a red circle", "two blue stars")]
    out = evaluate(images, ["a red circle", "two blue stars"])
    assert out["categories"]["single"] == {"accuracy": 1.0, "n": 1}
    assert out["overall"] == 1.0 and out["n"] == 2 and len(out["results"]) == 2
    out = evaluate([np.asarray(images[0])], ["a green circle"])
    assert out["overall"] == 0.0
    with pytest.raises(ValueError):
        evaluate(images, ["a red circle"])


def test_cli_table_and_json(tmp_path, capsys):
    folder = write_imagefolder(tmp_path / "imgs", 10, size=64, seed=5)
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--images", str(folder), "--json", str(tmp_path / "r.json")])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "overall" in out and "category" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["n"] == 10 and data["overall"] == 1.0
    with pytest.raises(ValueError):
        cli.run(parser.parse_args(["--images", str(tmp_path)]))
