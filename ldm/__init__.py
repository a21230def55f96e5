"""ldm: latent text-to-image diffusion in the Stable Diffusion family.

    import ldm
    pipe = ldm.Pipeline.from_pretrained()          # the small default model in weights/
    images = pipe("a red circle on the left", seed=0)
    images = pipe("a green star", image=images[0], strength=0.6)                  # img2img
    images = pipe("a green star", image=images[0], mask_image=mask)               # inpainting
    images = ldm.outpaint(pipe, "two red circles", images[0], right=128)          # outpainting
"""
from .config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .diffusion import LatentDiffusion
from .pipeline import Pipeline
from .recipes import hires, outpaint

__all__ = ["Pipeline", "LatentDiffusion", "LDMConfig", "UNetConfig", "AutoencoderConfig",
           "TextEncoderConfig", "ScheduleConfig", "outpaint", "hires"]
