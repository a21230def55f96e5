"""Image-conditioned networks: 9-channel inpainting UNets and the SD ×4 upscaler (7-channel UNet with
noise_level as class label and attn1 attending to the text, 3-level f=4 autoencoder, low-res noise
schedule) load and save in all three formats and compute what diffusers computes on the same weights."""
import json
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from ldm import LatentDiffusion, Pipeline
from ldm.config import LDMConfig, ScheduleConfig, UNetConfig
from ldm.presets import sd15, sd21, x4_upscaler
from ldm.formats import files
from ldm.formats.diffusers_configs import unet_config_from_diffusers, unet_config_to_diffusers, \
    vae_config_from_diffusers, vae_config_to_diffusers
from ldm.formats.diffusers_scheduler import schedule_from_diffusers
from ldm.formats.original import infer_config, to_original

from tiny_models import random_model, rel_err, tiny_inpaint, tiny_upscaler

TOL = 1e-5
FORMATS = {"ldm": "model.safetensors", "original": "original.safetensors", "diffusers": "diffusers"}
# diffusers' SD2 text encoder has no OpenCLIP last layer, text_projection nor logit_scale (test_checkpoint.py)
NOT_IN_DIFFUSERS = ("cond_stage_model.model.transformer.resblocks.2.", "cond_stage_model.model.text_projection",
                    "cond_stage_model.model.logit_scale")
KINDS = {"inpaint-sd1": lambda: tiny_inpaint("sd1"), "inpaint-sd2": lambda: tiny_inpaint("sd2"),
         "upscaler": tiny_upscaler}

# The real stabilityai/stable-diffusion-x4-upscaler configs, as on the Hub (diffusers 0.9 wrote them)
X4_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.9.0.dev0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False,
    "cross_attention_dim": 1024, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 7, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": 1000, "only_cross_attention": [True, True, True, False], "out_channels": 4,
    "sample_size": 128, "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], "use_linear_projection": True}
X4_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 3, "in_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
          "scaling_factor": 0.08333, "up_block_types": ["UpDecoderBlock2D"] * 3}
X4_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
                "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                "steps_offset": 1, "trained_betas": None}
X4_LOW_RES = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear",
              "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "trained_betas": None, "variance_type": "fixed_small"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per kind: the random model (every layer random) and its files in all three formats."""
    out = {}
    for name, make in KINDS.items():
        cfg, root = make(), tmp_path_factory.mktemp(name)
        pipe = Pipeline(random_model(cfg))
        paths = {fmt: root / f for fmt, f in FORMATS.items()}
        for fmt, path in paths.items():
            pipe.save_pretrained(path, fmt)
        out[name] = dict(cfg=cfg, pipe=pipe, **paths)
    return out


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.unet.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    y = torch.tensor([20, 350]) if cfg.unet.num_classes else None   # noise_level, the upscaler's class label
    return x, ctx, y


def _unet_outputs(unet, cfg, diffusers=False):
    x, ctx, y = _inputs(cfg)
    with torch.no_grad():
        return [unet(x, torch.tensor([t, max(t - 7, 0)]), encoder_hidden_states=ctx, class_labels=y).sample
                if diffusers else unet(x, torch.tensor([t, max(t - 7, 0)]), ctx, y) for t in (0, 1, 421, 999)]


# -- load / save in all three formats ------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_is_bit_exact(models, kind, fmt):
    m = models[kind]
    pipe = Pipeline.from_pretrained(m[fmt], config=m["cfg"] if fmt == "original" else None)
    a, b = pipe.model.state_dict(), m["pipe"].model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not (fmt == "diffusers" and k.startswith(NOT_IN_DIFFUSERS)))
    for x, y in zip(_unet_outputs(pipe.unet, m["cfg"]), _unet_outputs(m["pipe"].unet, m["cfg"])):
        assert torch.equal(x, y)
    want = m["cfg"]
    if fmt == "ldm":
        assert pipe.config == want
    if fmt == "diffusers":  # the folder's config files alone rebuild what the model computes
        assert (pipe.config.unet, pipe.config.autoencoder, pipe.config.schedule, pipe.config.low_res_schedule,
                pipe.config.max_noise_level) == (want.unet, want.autoencoder, want.schedule, want.low_res_schedule,
                                                 want.max_noise_level)
    assert pipe.config.image_conditioning == ("upscale" if kind == "upscaler" else "inpaint")


@pytest.mark.parametrize("kind", list(KINDS))
def test_saving_again_in_each_format_is_bit_exact(models, kind, tmp_path):
    """Loaded from one format, saved in another and loaded back: the same tensors (convert chains)."""
    m = models[kind]
    pipe = Pipeline.from_pretrained(m["diffusers"])
    for fmt, name in FORMATS.items():
        pipe.save_pretrained(tmp_path / name, fmt)
        back = Pipeline.from_pretrained(tmp_path / name, config=pipe.config if fmt == "original" else None)
        a, b = back.model.state_dict(), pipe.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b if not k.startswith(NOT_IN_DIFFUSERS))


def test_model_index_names_the_pipeline_of_the_kind(models):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionUpscalePipeline
    index = json.loads((models["inpaint-sd1"]["diffusers"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    ref = StableDiffusionInpaintPipeline.from_pretrained(models["inpaint-sd1"]["diffusers"], local_files_only=True)
    assert ref.unet.config.in_channels == 9
    m = models["upscaler"]
    index = json.loads((m["diffusers"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 350
    ref = StableDiffusionUpscalePipeline.from_pretrained(m["diffusers"], local_files_only=True)
    assert ref.config.max_noise_level == 350 and type(ref.low_res_scheduler).__name__ == "DDPMScheduler"
    assert ref.vae.config.scaling_factor == 0.08333
    ours = m["cfg"].low_res_schedule
    lr = ref.low_res_scheduler.config
    assert (lr.beta_schedule, lr.beta_start, lr.beta_end, lr.num_train_timesteps) == \
        (ours.beta_schedule, ours.beta_start, ours.beta_end, ours.num_train_timesteps)


# -- parity with diffusers on random weights -----------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_unet_matches_diffusers(models, kind):
    """The UNet as users load it from the folder we save (class_labels = noise_level for the upscaler)."""
    m = models[kind]
    theirs = UNet2DConditionModel.from_pretrained(m["diffusers"], subfolder="unet").eval()
    ours = Pipeline.from_pretrained(m["diffusers"]).unet
    for a, b in zip(_unet_outputs(ours, m["cfg"]), _unet_outputs(theirs, m["cfg"], diffusers=True)):
        assert b.abs().mean() > 1e-3     # every layer random: no trivial zero output
        assert rel_err(a, b) < TOL, rel_err(a, b)


def test_upscaler_attn1_attends_to_the_text(models):
    """disable_self_attentions is used, not just stored: attn1 of level 0 takes the context's width and
    the output depends on it (turning it off, with attn1 reading the block itself, computes something else)."""
    m = models["upscaler"]
    unet = m["pipe"].unet
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.to_k.weight.shape[1] == m["cfg"].unet.context_dim
    assert unet.input_blocks[3][1].transformer_blocks[0].attn1.to_k.weight.shape[1] == 64   # level 1: self
    theirs = UNet2DConditionModel.from_pretrained(m["diffusers"], subfolder="unet")
    assert theirs.down_blocks[0].attentions[0].transformer_blocks[0].only_cross_attention
    assert not theirs.down_blocks[1].attentions[0].transformer_blocks[0].only_cross_attention
    x, ctx, y = _inputs(m["cfg"])
    with torch.no_grad():
        a = unet(x, torch.tensor([5, 5]), ctx, y)
        b = unet(x, torch.tensor([5, 5]), ctx.flip(0), y)
    assert rel_err(a, b) > 1e-3


def test_f4_vae_matches_diffusers(models):
    m = models["upscaler"]
    assert m["cfg"].autoencoder.downsample_factor == 4
    theirs = AutoencoderKL.from_pretrained(m["diffusers"], subfolder="vae").eval()
    ours = Pipeline.from_pretrained(m["diffusers"]).vae
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        pa, pb = ours.encode(x), theirs.encode(x).latent_dist
        assert pa.mean.shape == (2, 4, 8, 8)
        assert rel_err(pa.mean, pb.mean) < TOL and rel_err(pa.logvar, pb.logvar) < TOL
        out = ours.decode(pa.mean)
        assert out.shape == x.shape and rel_err(out, theirs.decode(pa.mean).sample) < TOL


# -- the real x4 upscaler's configs and layouts (no weights) -------------------------------------

def test_real_x4_diffusers_configs_read_as_the_preset():
    x4 = x4_upscaler()
    unet, size = unet_config_from_diffusers(X4_UNET, 4)
    assert unet == x4.unet and size == x4.sample_size
    assert vae_config_from_diffusers(X4_VAE) == x4.autoencoder
    assert schedule_from_diffusers(X4_SCHEDULER) == (x4.schedule, x4.default_sampler)
    assert schedule_from_diffusers(X4_LOW_RES)[0] == x4.low_res_schedule
    written = unet_config_to_diffusers(x4.unet, x4.latent_size)
    assert {k: written[k] for k in X4_UNET if not k.startswith("_") and k != "dual_cross_attention"} == \
        {k: v for k, v in X4_UNET.items() if not k.startswith("_") and k != "dual_cross_attention"}
    written = vae_config_to_diffusers(x4.autoencoder, 256)
    assert {k: written[k] for k in X4_VAE} == X4_VAE


@pytest.mark.parametrize("make", [x4_upscaler, lambda: _inpaint(sd15()), lambda: _inpaint(sd21(v_prediction=False))],
                         ids=["x4-upscaler", "sd15-inpainting", "sd2-inpainting"])
def test_full_size_original_layout(make):
    """At the real sizes, on the meta device: the config inferred from an original file's shapes (the
    x4's heads, attn1 flags, scale factor and schedules from its family), and diffusers' own converter
    mapping that file onto diffusers' model of our config, key for key and shape for shape."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = make()
    with torch.device("meta"):
        sd = to_original(LatentDiffusion(cfg).state_dict(), cfg)
    assert infer_config(sd, cfg.schedule.prediction_type) == cfg
    ucfg = unet_config_to_diffusers(cfg.unet, cfg.latent_size)
    with torch.device("meta"):
        theirs = UNet2DConditionModel.from_config(ucfg)
    converted = convert_ldm_unet_checkpoint(sd, ucfg)
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def _inpaint(cfg):
    return replace(cfg, unet=replace(cfg.unet, in_channels=9))


# -- original files: shape inference and what it can't tell -------------------------------------

def test_upscaler_config_inferred_from_original_shapes(models):
    m = models["upscaler"]
    raw, _ = files.read_safetensors(m["original"])
    got = infer_config(raw, num_heads=2, text_num_heads=2, sample_size=64)
    assert replace(got, default_steps=m["cfg"].default_steps) == m["cfg"]   # the x4's schedules included
    assert got.unet.disable_self_attentions == (True, False) and got.autoencoder.downsample_factor == 4


@pytest.mark.parametrize("kind", ["inpaint-sd1", "inpaint-sd2"])
def test_inpainting_config_inferred_from_original_shapes(models, kind):
    m = models[kind]
    raw, _ = files.read_safetensors(m["original"])
    heads = dict(num_heads=2) if kind == "inpaint-sd1" else dict(num_heads=-1, num_head_channels=16)
    got = infer_config(raw, m["cfg"].schedule.prediction_type, sample_size=32, text_num_heads=2, **heads)
    assert got.unet == m["cfg"].unet and got.unet.in_channels == 9 and got.image_conditioning == "inpaint"


def test_original_upscaler_file_with_low_scale_buffers_loads(models, tmp_path):
    """The real x4 file holds its low-res noise schedule's buffers (low_scale_model.*): recomputed, dropped."""
    m = models["upscaler"]
    raw, meta = files.read_safetensors(m["original"])
    raw.update({"low_scale_model.betas": torch.rand(1000), "low_scale_model.alphas_cumprod": torch.rand(1000)})
    save_file(raw, str(tmp_path / "x4.safetensors"), metadata=meta)
    pipe = Pipeline.from_pretrained(tmp_path / "x4.safetensors", config=m["cfg"])
    assert torch.equal(pipe.unet.label_emb.weight, m["pipe"].unet.label_emb.weight)


def test_ambiguous_attn1_asks_for_the_config(tmp_path):
    """Where a transformer is as wide as the context, to_k's shape can't tell self- from cross-attention."""
    cfg = tiny_upscaler(context_dim=64)          # level 1 and the middle block are 64 wide
    path = tmp_path / "x.safetensors"
    Pipeline(random_model(cfg)).save_pretrained(path, "original")
    raw, _ = files.read_safetensors(path)
    with pytest.raises(ValueError, match=r"level 1 and the middle block .*disable_self_attentions.*--config"):
        infer_config(raw, num_heads=2, text_num_heads=2)
    got = infer_config(raw, num_heads=2, text_num_heads=2, sample_size=64, disable_self_attentions=(True, False),
                       disable_middle_self_attn=False)
    assert got.unet == cfg.unet
    with pytest.raises(ValueError, match="--config"):
        Pipeline.from_pretrained(path)
    assert Pipeline.from_pretrained(path, config=cfg).config == cfg


# -- bad configs, refused with messages -----------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: UNetConfig(disable_self_attentions=(True, False)), r"disable_self_attentions must be null or one "
                                                                r"true/false per level \(4"),
    (lambda: LDMConfig(max_noise_level=350), "max_noise_level must be null without a low_res_schedule"),
    (lambda: replace(sd15(), low_res_schedule=ScheduleConfig(), max_noise_level=350),
     "low_res_schedule is set .* in_channels = out_channels \\+ 3"),
    (lambda: replace(x4_upscaler(), max_noise_level=1000), r"max_noise_level must be an integer in \[0, 999\]"),
    (lambda: replace(x4_upscaler(), max_noise_level=None), "max_noise_level must be an integer"),
    (lambda: LDMConfig.from_dict({"unet": {"disable_self_attentions": "yes"}}), "expected a list"),
])
def test_bad_configs_are_refused(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_unsupported_input_channels_are_named():
    cfg = replace(sd15(), unet=replace(sd15().unet, in_channels=5))   # depth2img-like: no pipeline for it
    with pytest.raises(ValueError, match="5 input channels .* inpainting \\(9\\) nor an upscaler \\(7"):
        cfg.image_conditioning


@pytest.mark.parametrize("key,value,match", [
    ("only_cross_attention", [True, False], "only_cross_attention=.*a list of 4"),
    ("only_cross_attention", "yes", "only_cross_attention=.*true, false or a list"),
    ("class_embed_type", "timestep", "class_embed_type='timestep' is invalid: expected one of None, 'projection'"),
    ("num_class_embeds", 0, "num_class_embeds=0 is invalid"),
])
def test_bad_diffusers_unet_keys_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**X4_UNET, key: value}, 4)


def test_only_cross_attention_as_one_bool_reads_for_every_block():
    unet, _ = unet_config_from_diffusers({**X4_UNET, "only_cross_attention": True}, 4)
    assert unet.disable_self_attentions == (True,) * 4 and not unet.disable_middle_self_attn
    unet, _ = unet_config_from_diffusers({**X4_UNET, "only_cross_attention": False}, 4)
    assert unet.disable_self_attentions is None


def test_what_diffusers_cant_express_is_refused_before_writing(models, tmp_path):
    m = models["upscaler"]
    cfg = replace(m["cfg"], unet=replace(m["cfg"].unet, disable_middle_self_attn=True))
    with pytest.raises(ValueError, match="disable_middle_self_attn"):
        Pipeline(random_model(cfg)).save_pretrained(tmp_path / "out", "diffusers")
    assert not (tmp_path / "out").exists()


def _copy(models, tmp_path):
    import shutil
    folder = tmp_path / "x4"
    shutil.copytree(models["upscaler"]["diffusers"], folder)
    return folder


@pytest.mark.parametrize("scaling_factor", [None, 0.18215])
def test_upscale_folder_vae_scale_is_the_x4s_as_in_diffusers(models, tmp_path, scaling_factor):
    """StableDiffusionUpscalePipeline sets the VAE's scaling_factor to 0.08333 (early Hub folders had none)."""
    folder = _copy(models, tmp_path)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    vae.pop("scaling_factor")
    if scaling_factor is not None:
        vae["scaling_factor"] = scaling_factor
    (folder / "vae" / "config.json").write_text(json.dumps(vae))
    if scaling_factor is None:
        assert Pipeline.from_pretrained(folder).config.autoencoder.scale_factor == 0.08333
    else:
        with pytest.warns(UserWarning, match="scaling_factor=0.18215: StableDiffusionUpscalePipeline uses 0.08333"):
            assert Pipeline.from_pretrained(folder).config.autoencoder.scale_factor == 0.08333


def test_upscale_folder_without_low_res_scheduler_is_named(models, tmp_path):
    folder = _copy(models, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    del index["low_res_scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionUpscalePipeline names no low_res_scheduler"):
        Pipeline.from_pretrained(folder)
    index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], max_noise_level=1000)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"max_noise_level must be an integer in \[0, 999\]"):
        Pipeline.from_pretrained(folder)
