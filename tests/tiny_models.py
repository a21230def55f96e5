"""Tiny random-weight models shared by the tests (diffusers' get_dummy_components pattern)."""
from dataclasses import replace

import torch

from ldm import LatentDiffusion
from ldm.config import sd21, tiny


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
