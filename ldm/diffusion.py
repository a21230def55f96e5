"""The latent diffusion model as one module: UNet, autoencoder and text encoder under their
SD-compat attribute names (`model.diffusion_model`, `first_stage_model`, `cond_stage_model`), so
its state dict is an original Stable Diffusion checkpoint's. The latent scale factor is applied
here and nowhere else."""
import torch
from torch import nn

from .autoencoder import AutoencoderKL
from .config import LDMConfig
from .text import build_text_encoder
from .unet import UNetModel
from .unclip import build_parts


class LatentDiffusion(nn.Module):
    def __init__(self, cfg: LDMConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # SD-compat: CompVis DiffusionWrapper
        self.model.diffusion_model = UNetModel(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.autoencoder)
        # None: an image-variation model, conditioned on the image embedding alone (ldm/unclip.py)
        self.cond_stage_model = build_text_encoder(cfg.text_encoder) if cfg.text_encoder is not None else None
        build_parts(self, cfg)     # the DALL·E 2 family's image encoder, noise augmentor and prior, if any

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    def encode_first_stage(self, x: torch.Tensor, generator: torch.Generator | None = None,
                           sample: bool = True, resample: bool = True) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), unit variance.
        resample=False: x is at the autoencoder network's size (see AutoencoderKL.encode)."""
        posterior = self.first_stage_model.encode(x, resample)
        z = posterior.sample(generator) if sample else posterior.mean
        return z * self.config.autoencoder.scale_factor

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> x (B, 3, H, W) in about [-1, 1]."""
        return self.first_stage_model.decode(z / self.config.autoencoder.scale_factor)
