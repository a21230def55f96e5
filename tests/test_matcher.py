"""The noised image–text matcher: its training targets, its guidance, and train_matcher.py."""
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.checkpoint import read_safetensors
from ldm.config import MatcherConfig
from ldm.data.matching import CELL_CLASSES, PAIRING, cell_labels, negative_captions, perturbations
from ldm.data.scenes import SceneObject, Scene, caption, layout, random_scene, write_imagefolder
from ldm.eval.prompts import COLOURS, SHAPES, parse
from ldm.guidance import matcher_guidance
from ldm.schedule import alphas_cumprod
from tiny_models import random_model, tiny_sd1, tiny_sd2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_matcher  # noqa: E402


def with_matcher(cfg, scale=0.0, from_t=500):
    return replace(cfg, matcher=MatcherConfig(text_layers=1, heads=4, guide_from_t=from_t),
                   default_matcher_scale=scale)


def _spec(text: str):
    """What a caption says, up to sizes (a caption may leave them out)."""
    spec = parse(text).canonical()
    return replace(spec, objects=tuple(replace(o, size=None) for o in spec.objects))


# -- training targets ------------------------------------------------------------------------------

def test_every_negative_caption_says_something_false_of_the_scene():
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng)
        truth = _spec(caption(scene, rng))
        sizes = {(o.colour, o.shape): o.size for o in scene.objects}
        for text in negative_captions(scene, 4, rng):
            wrong_size = any(o.size not in (None, sizes.get((o.colour, o.shape), o.size))
                             for o in parse(text).objects)
            assert _spec(text) != truth or wrong_size, (caption(scene, rng), text)


def test_pairing_edits_keep_the_words_and_change_who_has_them():
    a, b = SceneObject("circle", "red"), SceneObject("square", "blue")
    scene = Scene(layout((a, b), "left_of", random.Random(0)), "beige", "left_of", "two_objects")
    edits = dict((name, s) for name, s in perturbations(scene) if name in PAIRING)
    assert [(o.colour, o.shape) for o in edits["colours"].objects] == [("blue", "circle"), ("red", "square")]
    assert [(o.colour, o.shape) for o in edits["shapes"].objects] == [("red", "square"), ("blue", "circle")]
    assert edits["relation"].relation == "right_of"
    # half the negatives of a two-object scene come from these three edits, not one in twenty
    captions = negative_captions(scene, 400, random.Random(1))
    paired = sum(sorted((o.colour, o.shape) for o in parse(c).objects) == [("blue", "circle"), ("red", "square")]
                 or parse(c).canonical() == parse("a blue square left of a red circle").canonical()
                 for c in captions)
    assert 0.25 < paired / 400 < 0.5


def test_cell_labels_put_each_object_under_its_centre():
    rng = random.Random(3)
    for _ in range(50):
        scene = random_scene(rng)
        labels = cell_labels(scene, 8)
        assert labels.shape == (2, 8, 8)
        for obj in scene.objects:
            for x, y in obj.centres:
                col, row = min(int(x * 8), 7), min(int(y * 8), 7)
                assert labels[0, row, col] == list(COLOURS).index(obj.colour)
                assert labels[1, row, col] == list(SHAPES).index(obj.shape)
        empty = (labels[0] == CELL_CLASSES[0] - 1)
        assert ((labels[1] == CELL_CLASSES[1] - 1) == empty).all() and empty.any()


# -- the module and its guidance -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return Pipeline(random_model(with_matcher(tiny_sd1(), scale=5.0, from_t=500)))


def _logits(pipe, x, t, tokens):
    return pipe.model.match_logits(x, t, tokens, pipe.encode_prompt([""]))


def test_the_logit_reads_the_caption_up_to_its_end_token_only(pipe):
    te = pipe.text_encoder
    tokens = te.tokenize(["a red circle", "a blue square left of a green star"])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([900, 100])
    padded = tokens.clone()
    padded[0, 6:] = 320                                      # anything after ⟨eos⟩
    assert torch.allclose(_logits(pipe, x, t, tokens), _logits(pipe, x, t, padded), atol=1e-6)
    other = te.tokenize(["a blue circle", "a blue square left of a green star"])
    assert not torch.allclose(_logits(pipe, x, t, tokens)[0], _logits(pipe, x, t, other)[0])


def test_the_matcher_reads_the_unets_features_of_x_t(pipe):
    tokens = pipe.text_encoder.tokenize(["a red circle"] * 2)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    base = _logits(pipe, x, t, tokens)
    assert not torch.allclose(base, _logits(pipe, x + 0.5 * torch.randn_like(x), t, tokens))
    unet = pipe.model.unet
    with torch.no_grad():
        saved = unet.middle_block[0].in_layers[2].weight.clone()
        unet.middle_block[0].in_layers[2].weight.mul_(2)
        moved = _logits(pipe, x, t, tokens)
        unet.middle_block[0].in_layers[2].weight.copy_(saved)
    assert not torch.allclose(base, moved)
    assert not any(k.startswith("unet") or "diffusion_model" in k for k in pipe.model.matcher.state_dict())


def test_the_matcher_shares_the_text_encoders_token_table_and_is_stored_once(pipe, tmp_path):
    te = pipe.model.cond_stage_model.transformer.get_input_embeddings()
    assert pipe.model.matcher.token_embedding is te
    assert not any("embedding" in k and "position" not in k for k in pipe.model.matcher.state_dict())
    pipe.save_pretrained(tmp_path / "m.safetensors")
    back = Pipeline.from_pretrained(tmp_path / "m.safetensors")
    assert back.config.matcher == pipe.config.matcher and back.config.default_matcher_scale == 5.0
    for k, v in pipe.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    for fmt, path in (("original", tmp_path / "o.safetensors"), ("diffusers", tmp_path / "d")):
        with pytest.raises(ValueError, match="save as 'ldm'"):
            pipe.save_pretrained(path, fmt)
    assert not (tmp_path / "d").exists()


def test_guidance_acts_at_early_steps_only_and_raises_the_match(pipe):
    tokens = pipe.text_encoder.tokenize(["a red circle left of a blue square"] * 2)
    ac = alphas_cumprod(pipe.config.schedule)
    base = lambda x, t: torch.zeros_like(x)
    logits = lambda x, t: _logits(pipe, x, t, tokens)
    guided = matcher_guidance(base, logits, ac, 3.0, from_t=500)
    x = torch.randn(2, 4, 16, 16)
    late = torch.tensor([400, 400])
    assert torch.equal(guided(x, late), base(x, late))
    early = torch.tensor([800, 800])
    eps = guided(x, early)
    assert eps.abs().max() > 0
    # ε̂ = ε − s √(1−ᾱ) ∇ log σ(logit): moving x against ε̂ climbs the matcher's log-probability
    score = lambda x: torch.nn.functional.logsigmoid(logits(x, early)).sum()
    with torch.no_grad():
        assert score(x - 1e-2 * eps) > score(x)


def test_pipeline_guides_by_default_and_checks_the_scale(pipe):
    kw = dict(steps=4, seed=0, output_type="np", height=32, width=32)
    default = pipe("a red circle", **kw)
    off = pipe("a red circle", matcher_scale=0, **kw)
    explicit = pipe("a red circle", matcher_scale=5.0, **kw)
    assert abs(default - off).max() > 1e-4 and torch.equal(torch.tensor(default), torch.tensor(explicit))
    assert pipe("a red circle", **{**kw, "output_type": "pil"})[0].info["matcher_scale"] == 5.0
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="matcher_scale"):
            pipe("a red circle", matcher_scale=bad, **kw)
    plain = Pipeline(random_model(tiny_sd1()))
    with pytest.raises(ValueError, match="needs a model with a matcher"):
        plain("a red circle", matcher_scale=1.0, **kw)
    v_pred = Pipeline(random_model(with_matcher(tiny_sd2())))
    with pytest.raises(ValueError, match="corrects ε"):
        v_pred("a red circle", matcher_scale=1.0, **kw)


def test_ldm_generate_takes_the_matcher_scale_and_records_it(pipe, tmp_path):
    from ldm.cli import main as cli
    pipe.save_pretrained(tmp_path / "m.safetensors")
    args = ["generate", "a red circle", "--model", str(tmp_path / "m.safetensors"), "--steps", "3",
            "--seed", "2", "-q"]
    assert cli(args + ["-o", str(tmp_path / "a.png"), "--matcher-scale", "2"]) == 0
    assert cli(args + ["-o", str(tmp_path / "b.png")]) == 0                      # the model's default: 5
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.text["matcher_scale"] == "2.0" and "Matcher scale: 2.0" in a.text["parameters"]
    assert b.text["matcher_scale"] == "5.0"
    ref = Pipeline.from_pretrained(tmp_path / "m.safetensors")("a red circle", steps=3, seed=2, matcher_scale=2.0)[0]
    assert np.array_equal(np.asarray(a), np.asarray(ref)) and not np.array_equal(np.asarray(a), np.asarray(b))


def test_a_t5_model_cannot_have_a_matcher():
    cfg = with_matcher(tiny_sd1())
    with pytest.raises(ValueError, match="BPE"):
        random_model(replace(cfg, text_encoder=replace(cfg.text_encoder, kind="t5")))


# -- train_matcher.py ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("matcher")
    Pipeline(random_model(tiny_sd1())).save_pretrained(root / "tiny.safetensors", dtype=torch.float16)
    write_imagefolder(root / "scenes", 40, size=32, seed=7)
    return root


def _train(root, out, *extra):
    train_matcher.main(["--model", str(root / "tiny.safetensors"), "--data", str(root / "scenes"),
                        "--out-dir", str(out), "--batch-size", "8", "--holdout", "8", "--text-layers", "1", *extra])


class Crash(Exception):
    pass


def test_train_matcher_writes_the_model_with_its_matcher_and_resumes_exactly(scene_data, tmp_path, monkeypatch):
    _train(scene_data, tmp_path / "straight", "--steps", "6", "--save-every", "6", "--scale", "7")
    calls, captions = [], train_matcher.Batches.captions

    def crash_at_step_4(self, *args):  # call 1 makes the validation captions, call 1 + k step k's
        calls.append(1)
        if len(calls) == 5:
            raise Crash
        return captions(self, *args)
    monkeypatch.setattr(train_matcher.Batches, "captions", crash_at_step_4)
    with pytest.raises(Crash):
        _train(scene_data, tmp_path / "crashed", "--steps", "6", "--save-every", "3", "--scale", "7")
    monkeypatch.undo()
    assert torch.load(tmp_path / "crashed" / "state.pt", weights_only=False)["step"] == 3
    assert not (tmp_path / "crashed" / "model.safetensors").exists()
    _train(scene_data, tmp_path / "crashed", "--steps", "6", "--save-every", "3", "--scale", "7", "--resume")
    a = Pipeline.from_pretrained(tmp_path / "straight" / "model.safetensors")
    b = Pipeline.from_pretrained(tmp_path / "crashed" / "model.safetensors")
    assert a.config.default_matcher_scale == 7.0 and a.config.matcher.text_layers == 1
    written, _ = read_safetensors(tmp_path / "straight" / "model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float16}          # the input model's precision
    for k, v in a.model.matcher.state_dict().items():                       # resumed: the same weights
        assert torch.allclose(v, b.model.matcher.state_dict()[k], atol=1e-6), k
    base = Pipeline.from_pretrained(scene_data / "tiny.safetensors")
    for k, v in base.model.state_dict().items():                             # the model itself untouched
        assert torch.equal(v, a.model.state_dict()[k]), k


def test_train_matcher_refuses_images_without_scene_records(scene_data, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in sorted((scene_data / "scenes").glob("*.png"))[:4]:
        (plain / f.name).write_bytes(f.read_bytes())
        (plain / f.name).with_suffix(".txt").write_text("a red circle")
    with pytest.raises(ValueError, match="scene record"):
        train_matcher.main(["--model", str(scene_data / "tiny.safetensors"), "--data", str(plain),
                            "--out-dir", str(tmp_path / "o"), "--steps", "1"])
    with pytest.raises(ValueError, match="--resume"):
        _train(scene_data, tmp_path / "nothing", "--steps", "2", "--resume")
