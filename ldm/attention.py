"""Attention for the UNet: multi-head (cross-)attention through F.scaled_dot_product_attention,
GEGLU feed-forward, BasicTransformerBlock and SpatialTransformer. Parameter names follow CompVis
`ldm/modules/attention.py` so SD checkpoints load with strict=True."""
import torch.nn.functional as F
from torch import nn

from .layers import normalize, zero_module


def attention(q, k, v, heads: int):
    """(B, Lq, nh*hd), (B, Lk, nh*hd) x2 -> (B, Lq, nh*hd). The one place attention runs."""
    B, Lq, C = q.shape
    q, k, v = (x.view(B, -1, heads, C // heads).transpose(1, 2) for x in (q, k, v))  # (B, nh, L, hd)
    out = F.scaled_dot_product_attention(q, k, v)                                   # (B, nh, Lq, hd)
    return out.transpose(1, 2).reshape(B, Lq, C)


class CrossAttention(nn.Module):
    """Queries from x; keys and values from `context` (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, feed-forward; each residual.
    disable_self_attn (the x4 upscaler's first levels): attn1 attends to the text too."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the h·w positions of a feature map, conditioned on `context` (B, L, D).
    SD1 projects in/out with 1×1 convs, SD2 with Linear layers (`use_linear`)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int = 32, disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = normalize(channels, groups, eps=1e-6)
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, disable_self_attn) for _ in range(depth))
        self.proj_out = zero_module(proj(inner, channels))

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)            # (B, H*W, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, -1, H, W)  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h
