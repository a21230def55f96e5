"""A prior beside a text-to-image model that draws variations (the default model's layout): text ->
prior -> CLIP image embedding -> image adapter -> context. On a tiny random-weight model: the prior reads
the model's own text encoder, draws before the latents from the one generator, feeds the same adapter
and CFG as variations; its file round-trips and is refused for another model; bad input is refused
before work; `ldm generate --prior` draws what the Python call draws and records it."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm import prior as text_prior
from ldm.cli import main as cli
from ldm.image_config import ImageAdapterConfig, PriorConfig
from ldm.prior import DiffusionPrior
from tiny_models import random_model, tiny_image_encoder, tiny_sd1

PROMPTS = ["a red circle", "two blue squares"]


def tiny_text_variation():
    """A text model with an image tower and an adapter to as many context tokens as the text encoder gives."""
    cfg = tiny_sd1()
    return replace(cfg, image_embedding="context", image_encoder=tiny_image_encoder(),
                   image_adapter=ImageAdapterConfig(tokens=cfg.text_encoder.max_length, hidden=32))


def random_prior(pipe, seed=0) -> DiffusionPrior:
    import train_unclip
    text_cfg = pipe.config.text_encoder
    torch.manual_seed(seed)
    prior = DiffusionPrior(PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                       embedding_dim=text_cfg.hidden_size, num_embeddings=text_cfg.max_length),
                           train_unclip.PRIOR_SCHEDULE, text_cfg, shared_text=pipe.model.cond_stage_model)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        prior.transformer.clip_std.abs_().add_(0.5)
    return prior.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_prior")
    pipe = Pipeline(random_model(tiny_text_variation()))
    pipe.save_pretrained(root / "model.safetensors", "ldm")
    text_prior.save(random_prior(pipe), root / "prior.safetensors")
    return root


@pytest.fixture()
def pipe(files):
    pipe = Pipeline.from_pretrained(files / "model.safetensors")
    text_prior.attach(pipe, files / "prior.safetensors")
    return pipe


def test_the_prior_reads_the_model_text_encoder_and_round_trips(files, pipe):
    prior = pipe.prior
    assert not any(k.startswith("shared_text") or "text_model" in k for k in prior.state_dict())  # shared, not copied
    embeds, hidden, mask = prior.encode(["a red circle"], "cpu")
    ids = pipe.model.cond_stage_model.tokenize(["a red circle"])
    assert torch.equal(hidden, pipe.model.cond_stage_model(ids))
    n_tokens = len(prior.tokenizer.encode("a red circle")) + 2                          # start, words, end
    assert mask[0].sum() == n_tokens and mask[0, :n_tokens].all()
    torch.testing.assert_close(embeds, prior.text_projection(hidden[:, n_tokens - 1]))  # the end token's state
    fresh = random_prior(pipe)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in prior.state_dict().items())
    a = prior.sample(PROMPTS, 5, 4.0, torch.Generator().manual_seed(1), "cpu")
    b = fresh.sample(PROMPTS, 5, 4.0, torch.Generator().manual_seed(1), "cpu")
    assert a.shape == (2, 32) and torch.equal(a, b)


def test_prior_draws_first_then_the_latents_from_one_generator(pipe):
    kw = dict(steps=3, prior_steps=4, use_prior=True, output_type="latent", sampler="ddim")
    out = pipe(PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    g = torch.Generator().manual_seed(5)
    pipe.prior.sample(PROMPTS, 4, 4.0, g, "cpu")                       # the prior's start and its step noise
    latents = torch.randn(out.shape, generator=g)
    # given those latents, the prior (drawing from the seeded generator first) gives the same result
    assert torch.equal(pipe(PROMPTS, latents=latents, generator=torch.Generator().manual_seed(5), **kw), out)
    assert torch.equal(pipe(PROMPTS, seed=5, **kw), out)              # seed= is that generator
    assert not torch.equal(pipe(PROMPTS, seed=6, **kw), out)


def test_prior_embedding_goes_through_the_variations_adapter_and_cfg(pipe, monkeypatch):
    """With the prior's embedding swapped for an image's, the prior path draws that image's variation."""
    image = Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype(np.uint8))
    embedding = pipe.encode_image_embedding(image)
    monkeypatch.setattr(pipe.prior, "sample", lambda prompts, *a: embedding.expand(len(prompts), -1))
    kw = dict(steps=3, seed=2, output_type="np", num_images_per_prompt=2)
    via_prior = pipe("anything", use_prior=True, **kw)
    assert np.array_equal(via_prior, pipe(image=image, **kw))
    assert not np.array_equal(via_prior, pipe("anything", **kw))      # the text path is another picture


def test_prior_settings_change_the_picture(pipe):
    kw = dict(steps=3, seed=1, output_type="latent", use_prior=True)
    base = pipe("a red circle", **kw)
    assert not torch.equal(base, pipe("a red circle", prior_guidance_scale=1.0, **kw))
    assert not torch.equal(base, pipe("a red circle", prior_steps=3, **kw))
    assert not torch.equal(base, pipe("a green star", **kw))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(use_prior=True, image=Image.new("RGB", (8, 8))), ValueError, "leave image= out"),
    (dict(use_prior=True, noise_level=3), ValueError, "noise_level applies to Stable unCLIP"),
    (dict(use_prior=True, prior_steps=0), ValueError, "prior_steps"),
    (dict(use_prior=True, prior_guidance_scale=-1), ValueError, "prior_guidance_scale"),
    (dict(use_prior="yes"), TypeError, "use_prior must be True or False"),
    (dict(prior_steps=4), ValueError, "apply with a prior"),
    (dict(use_prior=True, regions=[("a cat", (0, 0, 0.5, 0.5))]), ValueError, "no regional prompts"),
])
def test_bad_prior_input_is_refused_before_work(pipe, kwargs, error, match, monkeypatch):
    monkeypatch.setattr(pipe.prior, "sample", lambda *a: pytest.fail("sampled before refusing"))
    with pytest.raises(error, match=match):
        pipe("a red circle", steps=2, **kwargs)


def test_a_prior_attaches_only_where_it_fits(files):
    bare = Pipeline.from_pretrained(files / "model.safetensors")
    with pytest.raises(ValueError, match="attach one first"):
        bare("a red circle", use_prior=True)
    plain = Pipeline(random_model(tiny_sd1()))
    with pytest.raises(ValueError, match="image adapter"):
        text_prior.attach(plain, files / "prior.safetensors")
    other_text = replace(tiny_text_variation(), text_encoder=replace(tiny_sd1().text_encoder, num_layers=3))
    with pytest.raises(ValueError, match="another text encoder"):
        text_prior.attach(Pipeline(random_model(other_text)), files / "prior.safetensors")
    with pytest.raises(ValueError, match="not a prior file"):
        text_prior.attach(bare, files / "model.safetensors")
    with pytest.raises(ValueError, match="no such prior file"):
        text_prior.attach(bare, files / "missing.safetensors")


def cli_against_python(files, pipe, out, flags: list[str], **kw) -> Image.Image:
    """`ldm generate "a red circle" --prior ... FLAGS` next to pipe(..., use_prior=True, **kw): the same
    pixels; the PNG is returned for its records."""
    assert cli(["generate", "a red circle", "--model", str(files / "model.safetensors"), "--prior",
                str(files / "prior.safetensors"), *flags, "-o", str(out), "-q"]) == 0
    ref = pipe("a red circle", use_prior=True, prompt_syntax="a1111", **kw)
    png = Image.open(out)
    assert np.array_equal(np.asarray(png), np.asarray(ref[0]))
    return png


def test_cli_prior_draws_the_python_call_and_records_it(files, pipe, tmp_path, capsys):
    out = tmp_path / "prior.png"
    png = cli_against_python(files, pipe, out, ["--prior-steps", "4", "--steps", "3", "--seed", "7"],
                             prior_steps=4, steps=3, seed=7)
    assert "Prior steps: 4, Prior scale: 4.0" in png.text["parameters"]
    assert png.text["prior_steps"] == "4" and png.text["prior_guidance_scale"] == "4.0"
    model = ["--model", str(files / "model.safetensors"), "-o", str(tmp_path / "x.png"), "-q"]
    for args, match in [(["--prior", str(files / "prior.safetensors"), "--image", str(out)], "no --image"),
                        (["--prior-steps", "4"], "add --prior"),
                        (["--prior", str(tmp_path / "none.safetensors")], "no such file"),
                        (["--prior"], "needs a PATH"),
                        (["--prior", str(files / "prior.safetensors"), "--prior-scale", "-2"], "--prior-scale")]:
        assert cli(["generate", "a red circle", *model, *args]) != 0
        assert match in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_eval_scores_the_prior_path(files, tmp_path):
    """`ldm eval --model M --prior P` draws each prompt through the prior (what docs/default_model.md reports)."""
    import json
    from ldm.shapes import eval_cli
    out = tmp_path / "eval.json"
    assert eval_cli.main(["--model", str(files / "model.safetensors"), "--prior", str(files / "prior.safetensors"),
                          "--limit", "3", "--steps", "2", "--json", str(out), "--out", str(tmp_path / "images")]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and 0 <= result["overall"] <= 1
    pipe = Pipeline.from_pretrained(files / "model.safetensors")
    text_prior.attach(pipe, files / "prior.safetensors")
    prompts = [json.loads(line)["text"] for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    ref = pipe(prompts, steps=2, latents=eval_cli.seeded_latents(pipe.config, [0, 1, 2]), seed=0, use_prior=True)
    for i, im in enumerate(ref):                                  # batch k's prior drawn with seed + k
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f"{i:04d}.png")), np.asarray(im))


def test_use_prior_on_stable_unclip_is_its_own_text_path():
    from tiny_models import tiny_unclip
    unclip = Pipeline(random_model(tiny_unclip(prior=True)))
    kw = dict(steps=2, prior_steps=3, seed=4, output_type="latent")
    assert torch.equal(unclip("a red fox", use_prior=True, **kw), unclip("a red fox", **kw))
    with pytest.raises(ValueError, match="leave image= out"):
        unclip("a red fox", use_prior=True, image=Image.new("RGB", (8, 8)), steps=2)


def test_the_default_model_ships_a_prior_that_finds_the_prompt_scene():
    """weights/ldm-default-prior.safetensors: for 25 eval prompts, the prior's embedding is nearest (among
    25 rendered scenes' CLIP embeddings) to the scene drawn for its own prompt far above chance (1/25);
    measured 0.76, cosine 0.84 to its own scene against -0.01 to the others."""
    from ldm.shapes.adherence import load_prompts
    from ldm.shapes.eval_cli import PROMPTS as EVAL_PROMPTS
    from ldm.shapes.scenes import render, scene_from_prompt
    pipe = Pipeline.from_pretrained(None)
    from ldm.pipeline import DEFAULT_PRIOR
    prior = text_prior.attach(pipe, DEFAULT_PRIOR)
    prompts = load_prompts(EVAL_PROMPTS)[::10][:25]
    scenes = pipe.encode_image_embedding([render(scene_from_prompt(p, seed=i), 64) for i, p in enumerate(prompts)])
    drawn = prior.sample(prompts, 25, 4.0, torch.Generator().manual_seed(0), "cpu")
    cos = torch.nn.functional.normalize(drawn, dim=1) @ torch.nn.functional.normalize(scenes.float(), dim=1).T
    assert (cos.argmax(1) == torch.arange(25)).float().mean() >= 0.5
    off = (cos.sum() - cos.diag().sum()) / (25 * 24)
    assert cos.diag().mean() > 0.7 and off < 0.2
    image = pipe("a red star", use_prior=True, steps=5, seed=0)[0]
    assert image.size == (512, 512)


def test_prior_steps_are_bounded_by_the_attached_prior_schedule(pipe):
    T = pipe.prior.schedule.num_train_timesteps
    with pytest.raises(ValueError, match="prior_steps"):
        pipe("a red circle", use_prior=True, prior_steps=T + 1, steps=2)


def test_cli_prior_scale_is_prior_guidance_scale(files, pipe, tmp_path):
    png = cli_against_python(files, pipe, tmp_path / "scale.png", ["--prior-scale", "2.5", "--steps", "2", "--seed", "3"],
                             prior_guidance_scale=2.5, steps=2, seed=3)
    assert "Prior steps: 25, Prior scale: 2.5" in png.text["parameters"]
