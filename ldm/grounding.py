"""Cross-attention grounding loss (TokenCompose, Wang et al. 2024): where an object is drawn, the UNet's
cross-attention should look at the words that name it. Binding "a red circle and a blue square" needs
the pixels of the circle to read "red" and "circle", not "blue"; the diffusion loss alone teaches this
slowly, because a swapped picture is only a little worse under it. Targets: ldm.data.grounding."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BasicTransformerBlock

MIN_SIDE = 8  # coarser maps (4x4 at the default model's bottom) cannot tell two objects apart


@contextlib.contextmanager
def recording_cross_attention(unet: nn.Module):
    """Yield a list that fills with every cross-attention's probabilities (B, h*w, L) of the forwards run
    inside the block; recording stops (and attention goes back to the fused kernel) on exit."""
    layers = [m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    maps: list[torch.Tensor] = []
    for layer in layers:
        layer.record = maps
    try:
        yield maps
    finally:
        for layer in layers:
            layer.record = None


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, groups: torch.Tensor):
    """(token, pixel) losses, each a mean over the maps of side >= MIN_SIDE and the named objects.

    maps: (B, P, L) attention probabilities of square feature maps; masks: (B, K, h, w) coverage of
    each object; groups: (B, K, L) bool, the tokens naming each object (all-False rows are skipped).
    token: (1 - the share of the object's tokens' attention that falls inside its mask)^2 (TokenCompose's
    L_token); pixel: BCE between the attention to the object's tokens at each position and its mask."""
    named = groups.any(dim=-1)                                                  # (B, K)
    token, pixel, n = masks.new_zeros(()), masks.new_zeros(()), 0
    if not named.any():
        return token, pixel
    g, pooled = groups.float(), {}
    for a in maps:
        side = math.isqrt(a.shape[1])
        if side < MIN_SIDE or side * side != a.shape[1]:
            continue
        if masks.shape[-1] < side:
            raise ValueError(f"object masks of {tuple(masks.shape[-2:])} are coarser than a {side}x{side} "
                             "attention map: make them at the latent size")
        if side not in pooled:  # several layers share a size
            pooled[side] = F.adaptive_avg_pool2d(masks.float(), side).flatten(2)  # (B, K, P)
        m = pooled[side]
        ak = torch.einsum("bpl,bkl->bkp", a.float(), g).clamp(1e-6, 1 - 1e-6)   # (B, K, P)
        inside = (ak * m).sum(-1) / ak.sum(-1)                                  # (B, K)
        token = token + ((1 - inside) ** 2)[named].mean()
        pixel = pixel + F.binary_cross_entropy(ak, m, reduction="none").mean(-1)[named].mean()
        n += 1
    return (token / n, pixel / n) if n else (token, pixel)
