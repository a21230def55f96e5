"""A noised image–text matcher: p(caption describes the image | x_t, t), for guidance.

GLIDE guided with a CLIP trained on noised images; Dhariwal & Nichol with a noised classifier. This
is the same idea with a matching head in place of CLIP's dot product: the caption's tokens attend to
the latent's positions and the positions to the tokens, so "a red circle left of a blue square" and
"a blue circle left of a red square" can score differently, which a pooled text vector (our tiny text
encoder's, or CLIP's) hardly tells apart. Trained on latents with hard negatives, captions of the same
scene with colours, shapes, relation, count or position changed (`ldm.data.negatives`), its gradient
steers the first sampling steps, where the starting noise otherwise decides which colour goes where.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MatcherConfig, TextEncoderConfig
from .layers import normalize, timestep_embedding
from .text import EOS_ID

_FREQUENCIES = 4  # of the sinusoidal image-position features


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.norm2 = normalize(channels, 8), normalize(channels, 8)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(channels, channels)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class NoisedMatcher(nn.Module):
    """logit(x_t, t, tokens) > 0: the caption describes the image. `token_embedding` is the text
    encoder's (shared, not stored twice; the matcher does not train it)."""

    def __init__(self, cfg: MatcherConfig, text_cfg: TextEncoderConfig, latent_channels: int = 4,
                 token_embedding: nn.Embedding | None = None):
        super().__init__()
        c, w = cfg.channels, text_cfg.hidden_size
        if c % 8 or w % cfg.heads or cfg.text_layers < 1:
            raise ValueError(f"matcher: channels ({c}) must divide by 8 (GroupNorm groups), the text width "
                             f"({w}) by heads ({cfg.heads}), and text_layers ({cfg.text_layers}) be ≥ 1")
        self.cfg = cfg
        token_embedding = token_embedding or nn.Embedding(text_cfg.vocab_size, w)
        self._token_embedding = [token_embedding]  # in a list: not a submodule, so not saved twice
        self.position = nn.Parameter(torch.randn(text_cfg.max_length, w) * 0.01)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 2 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(w)
        self.stem = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, c))
        self.blocks = nn.ModuleList([_ResBlock(c) for _ in range(3)])  # 2 at full size, 1 after pooling
        self.image_out = nn.Sequential(normalize(c, 8), nn.SiLU(), nn.Conv2d(c, w, 1))
        self.image_position = nn.Linear(4 * _FREQUENCIES, w)
        self.tokens_see_image = nn.MultiheadAttention(w, cfg.heads, batch_first=True)
        self.image_sees_tokens = nn.MultiheadAttention(w, cfg.heads, batch_first=True)
        self.token_head = nn.Sequential(nn.Linear(2 * w, w), nn.GELU(), nn.Linear(w, 1))
        self.image_head = nn.Sequential(nn.Linear(2 * w, w), nn.GELU(), nn.Linear(w, 1))

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._token_embedding[0]

    def image_features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,) -> (B, h/2 · w/2, width)."""
        emb = self.time(timestep_embedding(t, self.cfg.channels).to(x.dtype))
        h = self.stem(x)
        h = self.blocks[1](self.blocks[0](h, emb), emb)
        h = self.blocks[2](F.avg_pool2d(h, 2), emb)
        h = self.image_out(h) + self.grid_position(h.shape[-2:])
        return h.flatten(2).transpose(1, 2)                                 # (B, P, W)

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

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, h, w), t (B,), tokens (B, L) -> logits (B,)."""
        text, pad = self.text_features(tokens)
        return self.score(self.image_features(x, t), text, pad)
