"""Tiled decoding: latents too large to decode at once (an ×4 upscale to 2048², a hires pass) go
through the decoder in overlapping tiles, blended with linear ramps where they overlap, so memory
is that of one tile. The decoder's mid-block attention then sees one tile at a time, so tiles can
differ slightly from a whole decode (as diffusers' `enable_vae_tiling`); small images never tile."""
from __future__ import annotations

from typing import Callable

import torch

TILE = 64          # latent cells per tile side (512 px at f = 8), as diffusers' default
OVERLAP = 16       # latent cells shared by neighbouring tiles (25 %)


def starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    return sorted(set(list(range(0, size - tile, stride)) + [size - tile]))


def ramp(n: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """(n,) weights: rising over `overlap` at a side shared with a neighbour, 1 elsewhere."""
    w = torch.ones(n)
    k = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if lead:
        w[:overlap] = k
    if trail:
        w[n - overlap:] = k.flip(0)
    return w


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int,
                 tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
    """decode(z) for latents (B, C, h, w) of any size, one tile (and one image) at a time."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    b, _, h, w = z.shape
    ys, xs = starts(h, tile, tile - overlap), starts(w, tile, tile - overlap)
    out = weight = None
    for y in ys:
        for x in xs:
            part = torch.cat([decode(z[i:i + 1, :, y:y + tile, x:x + tile]) for i in range(b)])
            th, tw = part.shape[2:]
            wy = ramp(th, overlap * factor, y > 0, y + tile < h)
            wx = ramp(tw, overlap * factor, x > 0, x + tile < w)
            mask = (wy[:, None] * wx[None, :]).to(part)                       # (th, tw)
            if out is None:
                out = part.new_zeros(b, part.shape[1], h * factor, w * factor)
                weight = part.new_zeros(h * factor, w * factor)
            region = (slice(y * factor, y * factor + th), slice(x * factor, x * factor + tw))
            out[(..., *region)] += part * mask
            weight[region] += mask
    return out / weight
