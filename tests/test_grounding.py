"""Cross-attention grounding (ldm.grounding, ldm.data.grounding): which caption tokens name which object,
the objects' masks, the recorded attention, the loss, and train_ldm.py using it on rendered scenes."""
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.attention import attention, attention_with_probs
from ldm.config import tiny
from ldm.data.grounding import MAX_OBJECTS, object_masks, scenes_by_path, token_groups
from ldm.shapes.scenes import Scene, SceneObject, caption, layout, random_scene, write_imagefolder
from ldm.grounding import grounding_loss, recording_cross_attention
from ldm.text import Tokenizer
from ldm.unet import UNetModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_ldm  # noqa: E402
from test_train import base_args, run_in_process  # noqa: E402

TOK = Tokenizer(32)


def named_words(text, scene):
    """{object index: the words its token group covers}."""
    ids = TOK([text])[0].tolist()
    groups = token_groups(text, scene, TOK)
    return {k: [i for i, on in zip(ids, groups[k]) if on] for k in range(MAX_OBJECTS)}


def ids(text):
    return TOK.encode(text)


def test_words_are_the_tokenizer_split():
    text = "A big red cross, navy-blue crosses!"
    words = TOK.words(text)
    assert [w for w, _ in words] == ["a", "big", "red", "cross", ",", "navy", "-", "blue", "crosses", "!"]
    assert [i for _, piece in words for i in piece] == TOK.encode(text)


def _scene(*objects, relation=None):
    return asdict(Scene(layout(objects, relation, random.Random(0)), "navy", relation, "two_objects"))


def test_token_groups_bind_each_noun_phrase_to_its_object():
    scene = _scene(SceneObject("circle", "red"), SceneObject("square", "blue"), relation="left_of")
    # mentioned in the other order, with the inverse relation, and a colour in the background phrase
    text = "a blue square to the right of a big red circle on a navy blue background"
    got = named_words(text, scene)
    assert got == {0: ids("red circle"), 1: ids("blue square")}
    # the same shape twice: the colour decides which object a noun is
    scene = _scene(SceneObject("triangle", "green"), SceneObject("triangle", "purple"))
    assert named_words("one purple triangle and green triangle", scene) == {0: ids("green triangle"),
                                                                           1: ids("purple triangle")}
    # colour after the noun, plurals, and a phrase naming nothing in the scene
    one = asdict(Scene(layout([SceneObject("cross", "cyan", count=2)], None, random.Random(0)), "beige"))
    assert named_words("two crosses coloured cyan", one)[0] == ids("crosses cyan")
    assert named_words("a cyan circle", one) == {0: [], 1: []}


def test_token_groups_cover_every_object_of_generated_captions():
    for i in range(300):
        rng = random.Random(f"grounding-test:{i}")
        scene = random_scene(rng)
        groups = token_groups(caption(scene, rng), asdict(scene), TOK)
        assert groups[:len(scene.objects)].sum(1).min() >= 2, caption(scene, rng)
        assert not groups[len(scene.objects):].any() and not groups[:, 0].any()


def test_object_masks_cover_each_object_where_it_is_drawn():
    scene = _scene(SceneObject("square", "red", "large"), SceneObject("circle", "blue", "small"), relation="above")
    masks = object_masks(scene, 16)
    assert masks.shape == (MAX_OBJECTS, 16, 16) and 0 <= masks.min() and masks.max() <= 1
    for k, obj in enumerate(scene["objects"]):
        ys, xs = np.mgrid[0:16, 0:16] + 0.5
        cx, cy = (masks[k] * xs).sum() / masks[k].sum() / 16, (masks[k] * ys).sum() / masks[k].sum() / 16
        assert np.allclose((cx, cy), obj["centres"][0], atol=0.03)
    assert (masks[0] * masks[1]).sum() == 0                      # scenes never overlap
    assert masks[0].sum() > 1.5 * masks[1].sum()                 # large vs small
    assert scene["objects"][0]["centres"][0][1] < scene["objects"][1]["centres"][0][1]  # "above" is up


def test_recorded_attention_is_the_attention_that_runs():
    q, k, v = torch.randn(2, 10, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    out, probs = attention_with_probs(q, k, v, heads=4)
    torch.testing.assert_close(out, attention(q, k, v, heads=4), atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 10, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 10))

    cfg = tiny()
    unet = UNetModel(cfg.unet).eval()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, cfg.unet.context_dim)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        with recording_cross_attention(unet) as maps:
            recorded = unet(x, t, ctx)
        assert len(maps) > 0 and all(m.shape[0] == 1 and m.shape[2] == 5 for m in maps)
        assert {int(m.shape[1] ** 0.5) for m in maps} == {8}  # tiny(): attention at 8x8 only
        after = unet(x, t, ctx)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, plain)  # back on the fused kernel
    n = len(maps)
    with torch.no_grad():
        unet(x, t, ctx)
    assert len(maps) == n  # nothing appended once recording has stopped


def test_grounding_loss_is_low_when_the_words_are_looked_at_where_the_object_is():
    B, K, L, side = 1, 2, 6, 8
    masks = torch.zeros(B, K, side, side)
    masks[0, 0, :, :3], masks[0, 1, :, 5:] = 1, 1                        # left object, right object
    groups = torch.zeros(B, K, L, dtype=torch.bool)
    groups[0, 0, 1:3], groups[0, 1, 3:5] = True, True
    cols = torch.arange(side).repeat(side)                               # x of each of the 64 positions
    good = torch.full((B, side * side, L), 0.02)
    good[0, cols < 3, 1:3], good[0, cols >= 5, 3:5] = 0.45, 0.45         # each side reads its own words
    swapped = good.clone()
    swapped[0, cols < 3], swapped[0, cols >= 5] = good[0, cols >= 5][0], good[0, cols < 3][0]
    uniform = torch.full((B, side * side, L), 1 / L)
    tok_good, pix_good = grounding_loss([good], masks, groups)
    tok_swap, pix_swap = grounding_loss([swapped], masks, groups)
    tok_uni, _ = grounding_loss([uniform], masks, groups)
    assert tok_good < 0.01 < tok_uni < tok_swap and pix_good < pix_swap
    # maps coarser than MIN_SIDE are left out; no named object gives zero, not NaN
    assert grounding_loss([uniform[:, :16]], masks, groups)[0] == 0
    assert grounding_loss([uniform], masks, torch.zeros_like(groups))[0] == 0
    logits = torch.zeros(B, side * side, L, requires_grad=True)
    grounding_loss([logits.softmax(-1)], masks, groups)[0].backward()
    assert logits.grad[0, cols < 3, 1:3].max() < 0                       # gradient descent raises them


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("scenes"), 24, size=32, seed=7)


def test_scenes_by_path_reads_the_scene_records(scenes):
    found = scenes_by_path(scenes)
    rows = [json.loads(line) for line in (scenes / "metadata.jsonl").read_text().splitlines()]
    assert len(found) == len(rows) and found[(scenes / rows[0]["file_name"]).resolve()] == rows[0]["scene"]


def test_train_ldm_grounding_pulls_attention_onto_the_named_objects(scenes, tmp_path, monkeypatch):
    # the same batches, noise and steps, once with the loss only measured and once trained on
    def token_curve(weight, out):
        argv = base_args(scenes, out, **{"batch_size": 4, "max_steps": 50, "cond_drop": 0.0, "grounding": weight,
                                         "optim.lr": 2e-3, "optim.warmup_steps": 0})
        run_in_process(train_ldm, argv, monkeypatch)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r["grounding_token"] for r in log if "grounding_token" in r]
    measured, trained = token_curve(1e-9, tmp_path / "measured"), token_curve(2.0, tmp_path / "trained")
    assert len(trained) == 50 and all(np.isfinite(trained)) and measured[0] == trained[0]
    assert np.median(trained[-10:]) < np.median(measured[-10:]) - 0.05, (measured, trained)


def test_grounding_masks_are_made_at_the_latent_size_with_pixel_scale(scenes, tmp_path, monkeypatch):
    # pixel_scale 2: the network sees 32-px images of a 64-px model; masks must be 16x16 like its latents
    # (they were once made at 32 // (2 * 2) = 8 and blown up to the 16x16 attention maps)
    argv = base_args(scenes, tmp_path, **{"max_steps": 2, "grounding": 0.1, "data.resolution": 64,
                                          "model.autoencoder.pixel_scale": 2, "model.sample_size": 64})
    run_in_process(train_ldm, argv, monkeypatch)
    assert len([line for line in (tmp_path / "log.jsonl").read_text().splitlines() if "grounding_token" in line]) == 2
    masks = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="coarser than a 16x16 attention map"):
        grounding_loss([torch.full((1, 256, 4), 0.25)], masks, torch.ones(1, 2, 4, dtype=torch.bool))


def test_grounding_refuses_data_without_scenes_and_flips(tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    rows = [{"file_name": f"{i}.png", "text": "a red circle"} for i in range(2)]
    for row in rows:
        Image.new("RGB", (32, 32)).save(bare / row["file_name"])
    (bare / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="needs scene records"):
        run_in_process(train_ldm, base_args(bare, tmp_path / "run", grounding=0.1), monkeypatch)
    with pytest.raises(ValueError, match="data.random_flip=false"):
        run_in_process(train_ldm, base_args(bare, tmp_path / "run", grounding=0.1,
                                            **{"data.random_flip": True}), monkeypatch)
    with pytest.raises(ValueError, match="data.center_crop=true"):
        run_in_process(train_ldm, base_args(bare, tmp_path / "run", grounding=0.1,
                                            **{"data.center_crop": False, "data.cache_latents": False}), monkeypatch)
    with pytest.raises(ValueError, match="grounding must be >= 0"):
        run_in_process(train_ldm, base_args(bare, tmp_path / "run", grounding=-1.0), monkeypatch)
    assert not (tmp_path / "run").exists()  # refused before anything is written
