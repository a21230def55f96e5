"""ldm: latent text-to-image diffusion in the Stable Diffusion family.

    import ldm
    pipe = ldm.Pipeline.from_pretrained()          # the small default model in weights/
    images = pipe("a red circle on the left", seed=0)
"""
from .config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .diffusion import LatentDiffusion
from .pipeline import Pipeline

__all__ = ["Pipeline", "LatentDiffusion", "LDMConfig", "UNetConfig", "AutoencoderConfig",
           "TextEncoderConfig", "ScheduleConfig"]
