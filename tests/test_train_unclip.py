"""train_unclip.py (the default model's unCLIP decoder and prior) and train_classifier.py: tiny runs on
the default model, what their exports hold, and resuming."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_classifier  # noqa: E402
import train_unclip  # noqa: E402
from PIL import Image  # noqa: E402

from ldm import Pipeline  # noqa: E402
from ldm.cli import main as cli  # noqa: E402
from ldm.shapes import noisy_classifier as nc  # noqa: E402
from ldm.shapes import clip as shape_clip  # noqa: E402
from ldm.shapes.scenes import render, scene_from_prompt  # noqa: E402

TINY = ["--set", "n_scenes=8", "--set", "batch_size=4", "--set", "log_every=1", "--set", "checkpoint_every=1"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A shape-world CLIP file with random towers (python -m ldm.shapes.clip writes real ones)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    shape_clip.save(shape_clip.ShapeCLIP(), path)
    return path


@pytest.fixture(scope="module")
def scene():
    return render(scene_from_prompt("a red circle on the left", seed=0), 512)


def test_untrained_decoder_draws_as_the_base_model(clip_file, scene):
    """The class-vector MLP starts at zero: the image embedding changes nothing until trained."""
    base = Pipeline.from_pretrained(None)
    decoder = Pipeline(train_unclip.unclip_decoder("", str(clip_file)))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=4, seed=1, latents=latents, output_type="latent")
    assert torch.equal(decoder("a red circle", image=scene, **kw), base("a red circle", regions=None, **kw))


def test_decoder_then_prior_then_resume_onto_another_decoder(clip_file, scene, tmp_path):
    out = tmp_path / "decoder"
    train_unclip.main(["--set", "part=decoder", "--set", f"clip={clip_file}", "--set", f"out_dir={out}",
                       "--set", "max_steps=2", *TINY])
    decoder = Pipeline.from_pretrained(out / "decoder.safetensors")
    assert decoder.config.image_embedding == "unclip" and decoder.config.prior is None
    assert decoder.model.unet.label_emb[0][2].weight.abs().sum() > 0              # it learned something
    stats = decoder.model.noise_augmentor
    assert stats.data_std.min() > 0 and not torch.equal(stats.data_mean, torch.zeros_like(stats.data_mean))
    # variations, no prompt: `ldm generate --image --variations N` draws what the Python call draws
    source, png = tmp_path / "scene.png", tmp_path / "var.png"
    scene.save(source)
    assert cli(["generate", "--image", str(source), "--variations", "2", "--model", str(out / "decoder.safetensors"),
                "--steps", "2", "--seed", "3", "-o", str(png), "-q"]) == 0
    ref = decoder(image=scene, num_images_per_prompt=2, steps=2, seed=3)
    for i, im in enumerate(ref):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"var-{i:02d}.png")), np.asarray(im))

    prior_dir = tmp_path / "prior"
    args = ["--set", "part=prior", "--set", f"out_dir={prior_dir}", "--set", "max_steps=2", *TINY]
    train_unclip.main([*args, "--set", f"decoder={out / 'decoder.safetensors'}"])
    full = Pipeline.from_pretrained(prior_dir / "unclip.safetensors")
    assert full.config.prior is not None
    images = full(["a red circle", "two blue squares"], steps=2, prior_steps=3, seed=0)
    assert len(images) == 2
    # the prior reads the decoder's own text encoder (its hidden states), with a learned projection
    ids = full.model.cond_stage_model.tokenize(["a red circle"])
    torch.testing.assert_close(full.model.prior.text_encoder(ids).last_hidden_state,
                               full.model.cond_stage_model(ids), rtol=0, atol=1e-5)
    prior_weights = {k: v.clone() for k, v in full.model.prior.state_dict().items()}

    # --resume at max_steps with another decoder: that decoder, the trained prior, no more steps
    other = tmp_path / "other.safetensors"
    fresh = train_unclip.unclip_decoder("", str(clip_file))
    fresh.noise_augmentor.data_std.fill_(2.0)
    from ldm import checkpoint
    checkpoint.save(fresh.state_dict(), fresh.config, other)
    train_unclip.main([*args, "--set", f"decoder={other}", "--resume"])
    combined = Pipeline.from_pretrained(prior_dir / "unclip.safetensors")
    assert torch.equal(combined.model.noise_augmentor.data_std, torch.full_like(stats.data_std, 2.0))
    assert all(torch.equal(v, prior_weights[k]) for k, v in combined.model.prior.state_dict().items())
    steps = [json.loads(line)["step"] for line in (prior_dir / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_prior_part_beside_the_default_model_and_refused_for_a_plain_model(tmp_path):
    """part=prior without a decoder: a prior file for the default model, on its own text encoder."""
    from ldm import prior as text_prior
    out = tmp_path / "prior"
    train_unclip.main(["--set", "part=prior", "--set", f"out_dir={out}", "--set", "max_steps=2", "--set",
                       "text_drop=0.1", *TINY])
    pipe = Pipeline.from_pretrained(None)
    prior = text_prior.attach(pipe, out / "prior.safetensors")
    assert prior.text_projection.weight.abs().sum() > 0 and prior.transformer.clip_std.min() > 0
    images = pipe(["a red circle", "two blue squares"], use_prior=True, prior_steps=3, steps=2, seed=0)
    assert len(images) == 2 and images.request.prior_steps == 3
    plain = tmp_path / "plain.safetensors"
    from ldm import checkpoint
    from ldm.presets import tiny
    from tiny_models import random_model
    checkpoint.save(random_model(tiny()).state_dict(), tiny(), plain)
    with pytest.raises(ValueError, match="part=prior needs a Stable unCLIP decoder"):
        train_unclip.main(["--set", "part=prior", "--set", f"model={plain}", "--set", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="part must be"):
        train_unclip.main(["--set", "part=both", "--set", f"out_dir={tmp_path}"])


def test_train_classifier_runs_exports_and_resumes(tmp_path):
    args = ["--set", f"out_dir={tmp_path}", "--set", "n_scenes=16", "--set", "batch_size=8", "--set", "log_every=1",
            "--set", "checkpoint_every=1"]
    train_classifier.main([*args, "--set", "max_steps=2"])
    first = nc.load(tmp_path / "classifier.safetensors")
    train_classifier.main([*args, "--set", "max_steps=3", "--resume"])
    second = nc.load(tmp_path / "classifier.safetensors")
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]             # resumed at 2, not restarted
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_shape_clip_loads_back_and_serves_as_an_open_clip_model(clip_file, scene):
    """ldm.metrics.clip_score and semantic guidance's clip_text_score take the shape-world CLIP as
    they take an open_clip model: the same cosine as its own towers, differentiable in the picture."""
    from ldm.metrics import clip_score
    from ldm.semantic_guidance import clip_text_score
    model = shape_clip.load(clip_file)
    assert not any(p.requires_grad for p in model.parameters())
    prompts = ["a red circle on the left", "two blue squares"]
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(model.preprocess(scene)[None]), dim=-1)
        txt = torch.nn.functional.normalize(model.embed_text(prompts), dim=-1)
    cos = (img * txt).sum(-1)
    got = clip_score([scene, scene], prompts, model=model, preprocess=model.preprocess, tokenizer=model.tokenizer)
    assert got == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    pictures = (torch.from_numpy(np.array(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1).requires_grad_(True)
    score = clip_text_score(model, model.tokenizer, prompts[:1])(pictures)
    assert score.item() == pytest.approx(cos[0].item(), abs=0.02)        # differentiable resize vs PIL's
    score.sum().backward()
    assert pictures.grad.abs().sum() > 0


def test_adapter_fit_folds_its_standardisation_into_plain_layers():
    """fit_to_captions trains on standardised inputs and targets, then folds both into the first and last
    layers: the adapter alone maps raw embeddings to raw contexts."""
    from ldm.config import LDMConfig
    from ldm.image_config import ImageAdapterConfig, ImageEncoderConfig
    from ldm.unclip import ImageAdapter
    from tiny_models import tiny_sd1
    cfg = tiny_sd1()
    cfg = LDMConfig(**{**cfg.__dict__, "image_embedding": "context", "image_adapter": ImageAdapterConfig(3, 64),
                       "image_encoder": ImageEncoderConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                           intermediate_size=64, image_size=32, patch_size=8,
                                                           projection_dim=8)})
    g = torch.Generator().manual_seed(0)
    embeds = 5 + 3 * torch.randn(512, 8, generator=g)                       # far from standard
    w = torch.randn(8, 3 * cfg.unet.context_dim, generator=g)
    contexts = (10 + 4 * ((embeds - 5) / 3) @ w / 8 ** 0.5).reshape(512, 3, -1)   # a linear function of them
    adapter = ImageAdapter(cfg)
    loss = train_unclip.fit_to_captions(adapter, embeds, contexts, 300, g, batch=128)
    assert loss < 0.1                                                        # of the targets' variance
    with torch.no_grad():
        err = (adapter(embeds) - contexts).pow(2).mean() / contexts.var()
    assert err < 0.1


def test_variations_part_adds_an_adapter_and_leaves_the_text_path_alone(clip_file, scene, tmp_path, capsys):
    out = tmp_path / "var"
    train_unclip.main(["--set", "part=variations", "--set", f"clip={clip_file}", "--set", f"out_dir={out}",
                       "--set", "n_scenes=8", "--set", "fit_steps=3", "--set", "adapter_hidden=32"])
    path = out / "model.safetensors"
    pipe, base = Pipeline.from_pretrained(path), Pipeline.from_pretrained(None)
    assert pipe.config.image_embedding == "context" and pipe.config.image_adapter.tokens == 32
    assert {str(v.dtype) for v in pipe.model.image_adapter.state_dict().values()} <= {"torch.float32"}
    kw = dict(steps=2, seed=1, output_type="np")
    assert np.array_equal(pipe("a red circle on the left", **kw), base("a red circle on the left", **kw))
    img2img = dict(image=scene, strength=0.5, **kw)                        # a prompt with image=: img2img as before
    assert np.array_equal(pipe("a blue square", **img2img), base("a blue square", **img2img))
    ids = pipe.model.cond_stage_model.tokenize([""])
    torch.testing.assert_close(pipe.model.image_adapter.null_context, pipe.model.cond_stage_model(ids)[0],
                               rtol=0, atol=2e-3)                                 # (stored in fp16, as the model)
    # image= without a prompt: variations, drawn from the adapter's tokens against the null context
    images = pipe(image=scene, num_images_per_prompt=2, steps=2, seed=3)
    assert len(images) == 2 and images.request.prompts == ["", ""]
    source, png = tmp_path / "scene.png", tmp_path / "var.png"
    scene.save(source)
    assert cli(["generate", "--image", str(source), "--variations", "2", "--model", str(path), "--steps", "2",
                "--seed", "3", "-o", str(png), "-q"]) == 0
    for i, im in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"var-{i:02d}.png")), np.asarray(im))
    assert cli(["generate", "a red circle", "--image", str(source), "--variations", "2", "--model", str(path),
                "-o", str(tmp_path / "p.png"), "-q"]) == 2
    assert "leave the PROMPT out" in capsys.readouterr().err
    for fmt in ("original", "diffusers"):
        with pytest.raises(ValueError, match="image-variation adapter"):
            pipe.save_pretrained(tmp_path / f"x-{fmt}", fmt)


def test_variations_need_a_model_that_draws_them(scene, tmp_path, capsys):
    from tiny_models import random_model, tiny_sd1
    plain = tmp_path / "plain.safetensors"
    Pipeline(random_model(tiny_sd1())).save_pretrained(plain)
    scene.save(tmp_path / "scene.png")
    assert cli(["generate", "--image", str(tmp_path / "scene.png"), "--variations", "2", "--model", str(plain),
                "-o", str(tmp_path / "v.png"), "-q"]) == 2
    assert "draws no variations" in capsys.readouterr().err
    assert not list(tmp_path.glob("v*.png"))


def test_lazy_image_tower_matches_the_tower_and_keeps_transformers_out_of_text_runs(scene):
    """The default model's image tower waits in a LazyImageEncoder (same state-dict names and shapes)
    until variations need it, so a text-to-image run never imports transformers' CLIP."""
    import subprocess
    from ldm.image_encoder import ImageEncoder, LazyImageEncoder, tower_shapes
    cfg = shape_clip.IMAGE
    torch.manual_seed(0)
    tower = ImageEncoder(cfg).eval()
    assert {k: tuple(v.shape) for k, v in tower.state_dict().items()} == tower_shapes(cfg)
    lazy = LazyImageEncoder(cfg)
    lazy.load_state_dict(tower.state_dict())
    lazy.to(torch.float64)
    built = lazy.build().eval()
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, dtype=torch.float64)
    assert torch.equal(built(x), tower.double()(x))
    code = ("import sys, ldm; p = ldm.Pipeline.from_pretrained(); p('a red circle', steps=2, output_type='latent'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"
