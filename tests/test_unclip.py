"""Stable unCLIP: img2img (the image's noised CLIP embedding in the time embedding) and text -> prior ->
image, the same images as diffusers' StableUnCLIPImg2ImgPipeline / StableUnCLIPPipeline from the folder
as it ships and from the original single-file layout (embedder.*, noise_augmentor.*); bad input refused."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline
from safetensors import safe_open

from ldm import Pipeline
from tiny_models import random_model, tiny_unclip
from test_variations import photo

PIXEL_TOL = 1 / 255
SCHEDULERS = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    for name, prior in (("img2img", False), ("prior", True)):
        pipe = Pipeline(random_model(tiny_unclip(prior)))
        with torch.no_grad():                   # stored CLIP statistics, so normalising is not the identity
            pipe.model.noise_augmentor.data_mean.normal_(0, 0.3)
            pipe.model.noise_augmentor.data_std.uniform_(0.5, 2.0)
        pipe.save_pretrained(root / name, "diffusers")
        pipe.save_pretrained(root / f"{name}.safetensors", "original")
    return root


def reference(cls, folder, sampler):
    ref = cls.from_pretrained(folder)
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("source", ["diffusers", "original"])
@pytest.mark.parametrize("sampler,noise_level", [("ddim", 0), ("euler_ancestral", 300)])
def test_unclip_img2img_same_images_as_diffusers(unclip, source, sampler, noise_level):
    ref = reference(StableUnCLIPImg2ImgPipeline, unclip / "img2img", sampler)
    path = unclip / ("img2img" if source == "diffusers" else "img2img.safetensors")
    ours = Pipeline.from_pretrained(path, config=unclip / "img2img" if source == "original" else None)
    kw = dict(image=photo(0), noise_level=noise_level, guidance_scale=4.0)
    a = ref(prompt="a red circle", num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(3),
            output_type="np", **kw).images
    b = ours("a red circle", steps=4, seed=3, sampler=sampler, output_type="np", **kw)
    assert a.shape == b.shape == (1, 32, 32, 3) and a.std() > 0.05
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_unclip_original_file_holds_sd21_unclip_keys(unclip):
    with safe_open(str(unclip / "img2img.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embedder.model.visual.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert {"noise_augmentor.data_mean", "noise_augmentor.data_std",
            "model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.weight"} <= keys
    assert not any(k.startswith("embedder.clip.") for k in keys)


def test_noise_level_and_the_image_change_the_drawing(unclip):
    pipe = Pipeline.from_pretrained(unclip / "img2img")
    base = pipe("a", image=photo(0), steps=3, seed=1, output_type="np")
    assert np.abs(base - pipe("a", image=photo(7), steps=3, seed=1, output_type="np")).max() > 0.01
    assert np.abs(base - pipe("a", image=photo(0), noise_level=900, steps=3, seed=1, output_type="np")).max() > 0.01
    images = pipe(["a", "b"], image=photo(0), steps=2, seed=1, noise_level=5, num_images_per_prompt=2)
    assert len(images) == 4 and images.request.record(3)["noise_level"] == 5


@pytest.mark.parametrize("source", ["diffusers", "ldm"])
def test_text_prior_image_same_images_as_diffusers(unclip, source, tmp_path):
    ref = reference(StableUnCLIPPipeline, unclip / "prior", "ddim")
    path = unclip / "prior"
    if source == "ldm":
        Pipeline.from_pretrained(path).save_pretrained(tmp_path / "ours.safetensors")
        path = tmp_path / "ours.safetensors"
    ours = Pipeline.from_pretrained(path)
    kw = dict(noise_level=50, guidance_scale=3.0)
    a = ref(["two green stars", "a blue square"], num_inference_steps=4, prior_num_inference_steps=6,
            prior_guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(4), output_type="np", **kw).images
    b = ours(["two green stars", "a blue square"], steps=4, prior_steps=6, prior_guidance_scale=5.0, seed=4,
             sampler="ddim", output_type="np", **kw)
    assert a.shape == b.shape == (2, 32, 32, 3) and a.std() > 0.05
    assert np.abs(a - b).max() <= PIXEL_TOL


def test_prior_defaults_and_guidance(unclip):
    pipe = Pipeline.from_pretrained(unclip / "prior")
    images = pipe("a cat", steps=2, seed=0)
    assert (images.request.prior_steps, images.request.prior_guidance_scale) == (25, 4.0)
    a = pipe("a cat", steps=2, seed=0, prior_steps=4, output_type="np")
    b = pipe("a cat", steps=2, seed=0, prior_steps=4, prior_guidance_scale=1.0, output_type="np")
    assert np.abs(a - b).max() > 1e-3            # the prior's embedding reaches the decoder
    with pytest.raises(ValueError, match="no image encoder"):
        pipe.encode_image_embedding(photo(0))     # the StableUnCLIPPipeline folder has none


@pytest.mark.parametrize("model,kwargs,error,match", [
    ("img2img", dict(image=photo(0), noise_level=1000), ValueError, r"noise_level must be an integer in \[0, 999\]"),
    ("img2img", dict(image=photo(0), noise_level=-1), ValueError, r"noise_level must be an integer in \[0, 999\]"),
    ("img2img", dict(), ValueError, "has no prior: pass image="),
    ("img2img", dict(image=photo(0).convert("L")), ValueError, "L image; give an RGB one"),
    ("img2img", dict(image=photo(0), mask_image=photo(1)), ValueError, "mask_image is not taken"),
    ("img2img", dict(image=[photo(0)] * 2), ValueError, "2 images for 1 prompts"),
    ("img2img", dict(image=photo(0), prior_steps=3), ValueError, "leave them out with image="),
    ("prior", dict(prior_guidance_scale=-1), ValueError, "prior_guidance_scale must be"),
    ("prior", dict(prior_steps=0), ValueError, "prior_steps must be"),
])
def test_bad_unclip_input_is_refused_before_work(unclip, model, kwargs, error, match):
    pipe = Pipeline.from_pretrained(unclip / model)
    pipe.model.model.diffusion_model = None                       # any work fails differently
    for part in ("embedder", "prior"):
        if hasattr(pipe.model, part):
            setattr(pipe.model, part, None)
    with pytest.raises(error, match=match):
        pipe("a cat", steps=2, **kwargs)


def test_prior_options_refused_on_a_text_to_image_model(saved):
    with pytest.raises(ValueError, match="has none"):
        saved["sd1"]["pipe"]("a", prior_steps=3)


@pytest.mark.parametrize("width,layers,proj,act", [(1280, 32, 1024, "gelu"), (1024, 24, 768, "quick_gelu")])
def test_sd21_unclip_original_config_from_shapes(width, layers, proj, act):
    """SD 2.1-unclip-h / -l files: the image tower and noise augmentation from the shapes alone (meta tensors)."""
    from ldm.formats.unclip_parts import infer_original
    e = lambda *shape: torch.empty(*shape, device="meta")     # noqa: E731
    v = "embedder.model.visual."
    sd = {"model.diffusion_model.label_emb.0.0.weight": e(1280, 2 * proj), v + "conv1.weight": e(width, 3, 14, 14),
          v + "positional_embedding": e(257, width), v + "proj": e(width, proj),
          v + "transformer.resblocks.0.mlp.c_fc.weight": e(4 * width, width),
          **{f"{v}transformer.resblocks.{i}.ln_1.weight": e(width) for i in range(layers)}}
    out = infer_original(sd)
    enc = out["image_encoder"]
    assert (enc.hidden_size, enc.num_layers, enc.num_heads, enc.image_size, enc.patch_size, enc.projection_dim,
            enc.hidden_act) == (width, layers, 16, 224, 14, proj, act)
    assert out["image_embedding"] == "unclip" and out["adm_in_channels"] == 2 * proj
    assert out["embedding_noise_schedule"].beta_schedule == "squaredcos_cap_v2"
    assert infer_original({k: t for k, t in sd.items() if not k.startswith(v)}) == {}


def test_original_file_without_clip_stats_loads_them_as_zero_and_one(unclip, tmp_path):
    """SD 2.1-unclip files hold the noise schedule's buffers but not data_mean/std (non-persistent)."""
    from ldm.formats.files import read_safetensors, write_safetensors
    sd, meta = read_safetensors(unclip / "img2img.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("noise_augmentor.")}
    sd["noise_augmentor.alphas_cumprod"] = torch.ones(1000)           # a schedule buffer, recomputed
    write_safetensors(sd, tmp_path / "sd21-unclip-like.safetensors", meta)
    pipe = Pipeline.from_pretrained(tmp_path / "sd21-unclip-like.safetensors", config=unclip / "img2img")
    aug = pipe.model.noise_augmentor
    assert torch.equal(aug.data_mean, torch.zeros(1, 32)) and torch.equal(aug.data_std, torch.ones(1, 32))
