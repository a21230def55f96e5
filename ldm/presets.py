"""Presets: the published models' configs (SD 1.x, SD 2.x, the ×4 upscaler) and a tiny one for
tests, by name for `model_preset` and the benchmarks."""
from __future__ import annotations

from dataclasses import replace

from .config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig

def sd15() -> LDMConfig:
    """Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, ε-prediction, 512 px)."""
    return LDMConfig()


def sd21(v_prediction: bool = True) -> LDMConfig:
    """Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, 64-dim heads, linear proj).
    2.1 at 768 px predicts v; 2.1-base at 512 px predicts ε."""
    return LDMConfig(
        unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024,
                        use_linear_in_transformer=True),
        text_encoder=TextEncoderConfig(kind="openclip", hidden_size=1024, num_layers=24,
                                       num_heads=16, intermediate_size=4096, hidden_act="gelu",
                                       layer="penultimate", pad_with="zero", projection_dim=1024),
        schedule=ScheduleConfig(prediction_type="v_prediction" if v_prediction else "epsilon"),
        sample_size=768 if v_prediction else 512,
    )


def tiny(context_dim: int = 32) -> LDMConfig:
    """A tiny random-weight model for tests: 64 px images, 16 px latents."""
    return LDMConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_heads=2, context_dim=context_dim),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        text_encoder=TextEncoderConfig(hidden_size=context_dim, num_layers=2, num_heads=2,
                                       intermediate_size=37, projection_dim=context_dim),
        sample_size=32,
        default_steps=4,
    )


def x4_upscaler() -> LDMConfig:
    """stabilityai/stable-diffusion-x4-upscaler: the latents concatenated with the low-res RGB image
    (7 channels), noise_level as class label, attn1 attending to the text on its first levels, a 3-level
    f=4 autoencoder, v-prediction; 512 px out of 128 px. Schedules as its diffusers folder reads."""
    unet = UNetConfig(in_channels=7, model_channels=256, channel_mult=(1, 2, 2, 4), attention_resolutions=(8, 4, 2),
                      num_heads=8, context_dim=1024, use_linear_in_transformer=True, num_classes=1000,
                      disable_self_attentions=(True, True, True, False))
    return replace(sd21(), unet=unet, autoencoder=AutoencoderConfig(ch_mult=(1, 2, 4), scale_factor=0.08333),
                   schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"),
                   low_res_schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02, steps_offset=0, clip_sample=True,
                                                   set_alpha_to_one=None, skip_prk_steps=False),
                   max_noise_level=350, sample_size=512, default_steps=75, default_guidance_scale=9.0)


PRESETS = {"sd15": sd15, "sd21": sd21, "sd21-base": lambda: sd21(v_prediction=False), "tiny": tiny,
           "x4-upscaler": x4_upscaler}
