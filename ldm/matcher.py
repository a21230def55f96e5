"""A noised image–text matcher: p(caption describes the image | x_t, t), for guidance.

GLIDE guided with a CLIP trained on noised images; Dhariwal & Nichol with a noised classifier. This
is the same idea with a matching head in place of CLIP's dot product, read out from the UNet's own
features: the caption's tokens attend to the feature map's positions and the positions to the tokens,
so "a red circle left of a blue square" and "a blue circle left of a red square" can score
differently, which a pooled text vector hardly tells apart. Trained with hard negatives, captions of
the same scene with colours, shapes, the relation, a size, count or position changed
(`ldm.data.matching`); its gradient steers the first sampling steps, where the starting noise
otherwise decides which colour goes where.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MatcherConfig, TextEncoderConfig, UNetConfig
from .text import EOS_ID

_FREQUENCIES = 4  # of the sinusoidal image-position features


def readout_level_index(unet_cfg: UNetConfig) -> int:
    """Index of the UNet input block that ends the second level (half the latent size)."""
    if len(unet_cfg.channel_mult) < 2:
        raise ValueError("a matcher reads the UNet at half the latent size: the UNet needs ≥ 2 levels")
    return 2 * unet_cfg.num_res_blocks + 1


class NoisedMatcher(nn.Module):
    """logit(x_t, t, tokens) > 0: the caption describes the image. A readout head (Readout Guidance,
    Luo et al. 2024) on the frozen UNet's encoder features of x_t under the null prompt: the UNet
    already knows at t where and what it is about to draw, which a small tower trained from scratch on
    16×16 latents learns far too slowly (it told colours apart, hardly shapes). `token_embedding` is
    the text encoder's (shared, not stored twice; the matcher does not train it)."""

    def __init__(self, cfg: MatcherConfig, text_cfg: TextEncoderConfig, unet_cfg: UNetConfig,
                 token_embedding: nn.Embedding | None = None):
        super().__init__()
        w = text_cfg.hidden_size
        if w % cfg.heads or cfg.text_layers < 1:
            raise ValueError(f"matcher: the text width ({w}) must divide by heads ({cfg.heads}) and "
                             f"text_layers ({cfg.text_layers}) be ≥ 1")
        self.cfg, self.level = cfg, readout_level_index(unet_cfg)
        features = unet_cfg.model_channels * (unet_cfg.channel_mult[1] + unet_cfg.channel_mult[-1])
        if features % 8:
            raise ValueError(f"matcher: the UNet features it reads ({features} channels) must divide by 8")
        token_embedding = token_embedding or nn.Embedding(text_cfg.vocab_size, w)
        self._token_embedding = [token_embedding]  # in a list: not a submodule, so not saved twice
        self.position = nn.Parameter(torch.randn(text_cfg.max_length, w) * 0.01)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 2 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(w)
        self.readout = nn.Sequential(nn.GroupNorm(8, features), nn.Conv2d(features, w, 1), nn.SiLU(),
                                     nn.Conv2d(w, w, 1))
        self.image_position = nn.Linear(4 * _FREQUENCIES, w)
        self.tokens_see_image = nn.MultiheadAttention(w, cfg.heads, batch_first=True)
        self.image_sees_tokens = nn.MultiheadAttention(w, cfg.heads, batch_first=True)
        self.token_head = nn.Sequential(nn.Linear(2 * w, w), nn.GELU(), nn.Linear(w, 1))
        self.image_head = nn.Sequential(nn.Linear(2 * w, w), nn.GELU(), nn.Linear(w, 1))

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._token_embedding[0]

    def unet_features(self, unet, x: torch.Tensor, t: torch.Tensor, null_context: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,), the null prompt's context (1 or B, L, D) -> what the UNet's encoder
        makes of x_t at half the latent size and at its middle: (B, c1 + c2, h/2, w/2)."""
        middle, skips, _ = unet.encode(x.to(next(unet.parameters()).dtype), t,
                                       null_context.expand(x.shape[0], -1, -1))
        half = skips[self.level]
        return torch.cat([half, F.interpolate(middle, size=half.shape[-2:], mode="nearest")], 1)

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        """unet_features (B, F, h', w') -> (B, h' · w', width)."""
        h = self.readout(features.to(self.position.dtype))
        h = h + self.grid_position(h.shape[-2:])
        return h.flatten(2).transpose(1, 2)

    def grid_position(self, size) -> torch.Tensor:
        """(W, h, w): where each feature is, in coordinates of the whole image (so at any latent size),
        which "left of" and "at the top" need."""
        ys, xs = (torch.linspace(-1, 1, n, device=self.image_position.weight.device) for n in size)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)                   # (h, w, 2)
        k = torch.arange(1, _FREQUENCIES + 1, device=grid.device) * torch.pi / 2
        angles = (grid[..., None] * k).flatten(-2)                                      # (h, w, 2F)
        return self.image_position(torch.cat([angles.sin(), angles.cos()], -1)).permute(2, 0, 1)

    def text_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L) -> (B, L, width) and the padding mask (B, L), True after the first ⟨eos⟩."""
        eos = (tokens == EOS_ID).int().argmax(1)                                       # (B,)
        pad = torch.arange(tokens.shape[1], device=tokens.device)[None] > eos[:, None]  # keep ⟨eos⟩ itself
        h = self.token_embedding(tokens).detach().to(self.position.dtype) + self.position[: tokens.shape[1]]
        return self.text_norm(self.text(h, src_key_padding_mask=pad)), pad

    def score(self, image: torch.Tensor, text: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Image features (N, P, W) × text features (N, L, W) -> logits (N,)."""
        seen, _ = self.tokens_see_image(text, image, image, need_weights=False)           # (N, L, W)
        read, _ = self.image_sees_tokens(image, text, text, key_padding_mask=pad, need_weights=False)
        per_token = self.token_head(torch.cat([text, seen], -1)).squeeze(-1)            # (N, L)
        keep = (~pad).to(per_token.dtype)
        token_score = (per_token * keep).sum(1) / keep.sum(1)
        image_score = self.image_head(torch.cat([image, read], -1)).squeeze(-1).mean(1)  # (N,)
        return token_score + image_score

    def bind(self, unet, tokens: torch.Tensor, null_context: torch.Tensor):
        """(x_t, t) -> logits (B,) for these captions; the caption side is computed once, not per
        sampling step."""
        text, pad = self.text_features(tokens)
        return lambda x, t: self.score(self.image_features(self.unet_features(unet, x, t, null_context)), text, pad)

    def forward(self, unet, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                null_context: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,), tokens (B, L) -> logits (B,)."""
        return self.bind(unet, tokens, null_context)(x, t)
