"""Tiny random-weight models shared by the tests (diffusers' get_dummy_components pattern)."""
from dataclasses import replace

import torch

from ldm import LatentDiffusion
from ldm.presets import sd21, tiny, x4_upscaler


def tiny_sd1():
    """SD1.x family: CLIP text (last layer, eos padding), conv proj, ε-prediction."""
    return tiny()


def tiny_sd2():
    """SD2.x family: OpenCLIP text (penultimate, zero padding), head dim 16, linear proj, v-prediction."""
    base, cfg = tiny(), sd21()
    return replace(cfg, unet=replace(base.unet, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),
                   autoencoder=base.autoencoder,
                   text_encoder=replace(cfg.text_encoder, hidden_size=32, num_layers=3, num_heads=2,
                                        intermediate_size=37, projection_dim=32),
                   sample_size=32, default_steps=4)


def tiny_inpaint(family: str = "sd1"):
    """A SD1.5-inpainting / SD2-inpainting layout: [latents, mask, masked-image latents] in (9 channels)."""
    cfg = FAMILIES[family]()
    return replace(cfg, unet=replace(cfg.unet, in_channels=2 * cfg.unet.out_channels + 1))


def tiny_upscaler(context_dim: int = 48):
    """The x4 upscaler's layout at tiny widths: latents + low-res RGB in (7 channels), noise_level as class
    label, attn1 attending to the text on level 0 (its width, 32, unlike the context's: shapes tell), a
    3-level f=4 autoencoder, and the x4's schedules, scale factor and max_noise_level."""
    x4, base = x4_upscaler(), tiny_sd2()
    unet = replace(base.unet, in_channels=7, attention_resolutions=(2, 1), num_classes=1000, num_heads=2,
                   num_head_channels=-1, context_dim=context_dim, disable_self_attentions=(True, False))
    return replace(x4, unet=unet,
                   autoencoder=replace(base.autoencoder, ch_mult=(1, 2, 2), scale_factor=x4.autoencoder.scale_factor),
                   text_encoder=replace(base.text_encoder, hidden_size=context_dim, projection_dim=context_dim),
                   sample_size=64, default_steps=4)


def random_model(cfg, seed=0) -> LatentDiffusion:
    """All weights random, including the zero-initialised output layers, so nothing is trivially 0."""
    torch.manual_seed(seed)
    model = LatentDiffusion(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


FAMILIES = {"sd1": tiny_sd1, "sd2": tiny_sd2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# --- the DALL·E 2 family (ldm/unclip.py) ----------------------------------------------------------

def tiny_image_encoder(projection_dim: int = 32, hidden_act: str = "quick_gelu"):
    from ldm.image_config import ImageEncoderConfig
    return ImageEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37, image_size=32,
                              patch_size=8, projection_dim=projection_dim, hidden_act=hidden_act)


def tiny_variation():
    """lambdalabs/sd-image-variations' layout: no text encoder, the CLIP image embedding as context."""
    cfg = tiny_sd1()
    return replace(cfg, text_encoder=None, image_embedding="context", image_encoder=tiny_image_encoder())


def tiny_unclip(prior: bool = False):
    """SD 2.1-unclip's layout at tiny widths: OpenCLIP text, v-prediction, the noised image embedding (32)
    and its noise level's embedding (32) into the time embedding; with `prior`, Karlo's prior and its
    CLIP text encoder instead of the image encoder (the StableUnCLIPPipeline folder has none)."""
    from ldm.config import ScheduleConfig, TextEncoderConfig
    from ldm.image_config import PriorConfig
    cfg = tiny_sd2()
    base = dict(unet=replace(cfg.unet, adm_in_channels=64), image_embedding="unclip",
                embedding_noise_schedule=ScheduleConfig(beta_schedule="squaredcos_cap_v2", steps_offset=0))
    if not prior:
        return replace(cfg, **base, image_encoder=tiny_image_encoder(hidden_act="gelu"))
    return replace(cfg, **base, prior=PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                                  embedding_dim=32),
                   prior_text_encoder=TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37,
                                                        projection_dim=32),
                   prior_schedule=ScheduleConfig(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                                 clip_sample=True, clip_sample_range=5.0, steps_offset=0))
