"""Scene generator: determinism, imagefolder format, coverage, layout, captions, eval prompts."""
import json
import random
from pathlib import Path

import numpy as np
import pytest

from ldm.shapes import scenes
from ldm.shapes.scenes import (EXTENT, HELD_OUT, KINDS, Scene, SceneObject, caption, held_out,
                             random_scene, render, scene_from_prompt, write_imagefolder)
from ldm.shapes.prompts import BACKGROUNDS, COLOURS, INVERSE, SHAPES, parse

ROOT = Path(__file__).resolve().parents[1]


def _scenes(n, seed=0):
    out = []
    for i in range(n):
        rng = random.Random(f"test:{seed}:{i}")
        scene = random_scene(rng)
        out.append((scene, caption(scene, rng)))
    return out


def test_same_seed_identical_bytes(tmp_path):
    a = write_imagefolder(tmp_path / "a", 12, size=32, seed=3)
    b = write_imagefolder(tmp_path / "b", 12, size=32, seed=3)
    c = write_imagefolder(tmp_path / "c", 12, size=32, seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()


def test_imagefolder_format(tmp_path):
    out = write_imagefolder(tmp_path / "d", 20, size=48, seed=0)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["file_name"] == "00001.png"
    for row in rows:
        assert set(row) == {"file_name", "text", "scene"}
        from PIL import Image
        with Image.open(out / row["file_name"]) as img:
            assert img.size == (48, 48) and img.mode == "RGB"
        objs = row["scene"]["objects"]
        keys = {"shape", "colour", "size", "count", "position", "centres"}
        assert all(keys <= set(o) for o in objs)
        assert all(len(o["centres"]) == o["count"] for o in objs)
        parse(row["text"])


def test_held_out_excluded_by_default(tmp_path):
    def combos(folder):
        rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
        return {(o["colour"], o["shape"]) for r in rows for o in r["scene"]["objects"]}

    assert not combos(write_imagefolder(tmp_path / "a", 400, size=16, seed=0)) & set(HELD_OUT)
    everything = combos(write_imagefolder(tmp_path / "b", 400, size=16, seed=0,
                                          exclude_held_out=False))
    assert everything & set(HELD_OUT)
    assert held_out("red", "star") and not held_out("red", "circle")


def test_coverage_in_1000_samples():
    items = [s for s, _ in _scenes(1000)]
    objs = [o for s in items for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and len(SHAPES) >= 5
    assert {o.colour for o in objs} == set(COLOURS) and len(COLOURS) >= 8
    assert {s.background for s in items} == set(BACKGROUNDS) and len(BACKGROUNDS) >= 4
    assert {o.count for o in objs} == {1, 2, 3}
    assert {o.size for o in objs} == {"small", "large"}
    assert {o.position for o in objs} >= {"left", "right", "top", "bottom", "centre"}
    assert {s.relation for s in items} == set(INVERSE) | {None}
    assert {s.kind for s in items} == set(KINDS)


def test_palettes_far_apart():
    objs, bgs = np.array(list(COLOURS.values()), float), np.array(list(BACKGROUNDS.values()), float)
    pair = np.linalg.norm(objs[:, None] - objs[None], axis=2) + np.eye(len(objs)) * 1e3
    assert pair.min() > 80
    assert np.linalg.norm(objs[:, None] - bgs[None], axis=2).min() > 110


def _boxes(scene):
    return [(cx, cy, EXTENT[o.size]) for o in scene.objects for cx, cy in o.centres]


def test_layout_no_overlap_inside_and_unambiguous():
    for scene, _ in _scenes(1000, seed=1):
        boxes = _boxes(scene)
        for i, (x, y, s) in enumerate(boxes):
            assert s / 2 < x < 1 - s / 2 and s / 2 < y < 1 - s / 2
            for x2, y2, s2 in boxes[i + 1:]:
                assert max(abs(x - x2), abs(y - y2)) > (s + s2) / 2 + 0.02
        for o in scene.objects:
            for cx, cy in o.centres:
                if o.position == "left":
                    assert cx < 1 / 3 and (o.count > 1 or 1 / 3 < cy < 2 / 3)
                elif o.position == "right":
                    assert cx > 2 / 3
                elif o.position == "top":
                    assert cy < 1 / 3
                elif o.position == "bottom":
                    assert cy > 2 / 3
                elif o.position == "centre":
                    assert 1 / 3 < cx < 2 / 3 and 1 / 3 < cy < 2 / 3
        if scene.relation in ("left_of", "right_of"):
            (ax, ay), (bx, by) = scene.objects[0].centres[0], scene.objects[1].centres[0]
            assert (ax < bx) == (scene.relation == "left_of") and abs(ax - bx) > 0.2


def test_captions_parse_back_to_the_scene():
    for scene, text in _scenes(2000, seed=2):
        spec = parse(text).canonical()
        objs, rel = scene.objects, scene.relation
        if rel in ("right_of", "below"):
            objs, rel = (objs[1], objs[0]), INVERSE[rel]
        elif rel is None:
            objs = tuple(sorted(objs, key=lambda o: (o.shape, o.colour, o.count)))
        assert spec.relation == rel, text
        assert len(spec.objects) == len(objs), text
        for got, want in zip(spec.objects, objs):
            assert (got.shape, got.colour, got.count, got.position) == \
                (want.shape, want.colour, want.count, want.position), text
            assert got.size in (None, want.size), text
        assert spec.background in (None, scene.background), text
        assert spec.category == scene.kind or scene.kind == "colour" and spec.background, text


def test_captions_vary():
    texts = {t for _, t in _scenes(300, seed=3)}
    joined = " ".join(texts).lower()
    for phrase in ("centre", "center", "there is", "picture of", "left of", "above", "gray",
                   "grey"):
        assert phrase in joined
    assert len(texts) >= 290


def test_render_any_size_and_background():
    scene = scene_from_prompt("a red circle on a beige background")
    for size in (16, 37, 64, 128):
        img = render(scene, size)
        assert img.size == (size, size) and img.mode == "RGB"
        assert img.getpixel((0, 0)) == BACKGROUNDS["beige"]
    with pytest.raises(ValueError):
        render(scene, 4)


def test_scene_from_prompt():
    scene = scene_from_prompt("two blue circles on the left")
    (obj,) = scene.objects
    assert (obj.shape, obj.colour, obj.count, obj.position) == ("circle", "blue", 2, "left")
    assert all(cx < 1 / 3 for cx, _ in obj.centres)
    assert scene_from_prompt("a star") == scene_from_prompt("a star")
    rel = scene_from_prompt("a pink heart below a green ring")
    assert rel.relation == "below" and rel.objects[0].centres[0][1] > rel.objects[1].centres[0][1]
    with pytest.raises(ValueError):
        scene_from_prompt("three red circles in the centre")
    with pytest.raises(ValueError):
        scene_from_prompt("a red hexagon")


def test_unknown_shape_and_kind_errors():
    with pytest.raises(ValueError):
        render(Scene((SceneObject("blob", "red", "large", 1, None, ((0.5, 0.5),)),), "navy"), 32)
    with pytest.raises(ValueError):
        random_scene(random.Random(0), kinds=("nonsense",))


def test_cli_writes_imagefolder(tmp_path):
    assert scenes.main([str(tmp_path / "out"), "--n", "3", "--size", "32", "--seed", "1"]) == 0
    assert len((tmp_path / "out" / "metadata.jsonl").read_text().splitlines()) == 3


def test_repeated_kinds_weight_the_mix():
    rng = random.Random(0)
    kinds = [random_scene(rng, kinds=("single", "two_objects", "two_objects", "two_objects")).kind
             for _ in range(400)]
    assert 0.65 < kinds.count("two_objects") / len(kinds) < 0.85


def test_eval_prompt_file_is_fixed_balanced_and_held_out():
    path = ROOT / "configs" / "eval_prompts.txt"
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    prompts = [line for line in lines if line and not line.startswith("#")]
    assert any(all(f"{c} {s}" in h for c, s in HELD_OUT) for h in header)
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    cats = {}
    for p in prompts:
        spec = parse(p)
        cats[spec.category] = cats.get(spec.category, 0) + 1
        assert any(held_out(o.colour, o.shape) for o in spec.objects), p
    assert set(cats) == set(KINDS) and min(cats.values()) >= 40
    assert scenes.eval_prompts() == scenes.eval_prompts()  # the generating script is deterministic
