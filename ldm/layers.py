"""Shared building blocks of the UNet and the autoencoder: normalisation, zero-init,
sinusoidal timestep embedding, 2× down/up-sampling. Names follow CompVis."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def normalize(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with `groups` groups, reduced if the width is smaller (tiny test models)."""
    return nn.GroupNorm(min(groups, channels), channels, eps=eps, affine=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as identity (Improved DDPM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (B,) timesteps, int or float -> (B, dim).
    SD-compat: CompVis order; diffusers' flip_sin_to_cos=True, freq_shift=0."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                      # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Downsample(nn.Module):
    """Stride-2 3×3 conv (UNet: symmetric padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2× (or to `size`, when the input was odd-sized) then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
