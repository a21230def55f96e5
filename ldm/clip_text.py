"""CLIP's text transformer (SD1's text encoder), with transformers' `CLIPTextModel` parameter names.

Ours rather than `transformers.CLIPTextModel` because importing transformers' model code costs ~3.5 s
at start-up here (it pulls in torch.distributed and dynamo), longer than the default model takes to
draw a picture. The same operations in the same order (transformers' SDPA path), so the outputs
are bit for bit transformers' (tests/test_text.py checks it); state dicts load either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_length: int):
        super().__init__()
        # transformers' init (normal, std 0.02), skipped for meta tensors (loading a checkpoint): normal_
        # on the meta device imports torch._dynamo, ~2 s of start-up
        self.token_embedding = nn.Embedding(vocab_size, width, _weight=torch.empty(vocab_size, width))
        self.position_embedding = nn.Embedding(max_length, width, _weight=torch.empty(max_length, width))
        for emb in (self.token_embedding, self.position_embedding):
            if not emb.weight.is_meta:
                nn.init.normal_(emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.position_embedding.weight[: tokens.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.q_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class CLIPTextTransformer(nn.Module):
    """tokens (B, L) -> hidden states (B, L, D) after the final LayerNorm, causal attention.
    `skip_last=1` stops one layer early (SD2's "penultimate" layer), still through the final LN."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, hidden: int, max_length: int,
                 act: str = "quick_gelu", eps: float = 1e-5):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.embeddings = Embeddings(vocab_size, width, max_length)
        self.encoder = Encoder([Layer(width, heads, hidden, act, eps) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        if tokens.shape[1] > self.embeddings.position_embedding.num_embeddings:
            raise ValueError(f"CLIP takes at most {self.embeddings.position_embedding.num_embeddings} tokens "
                             f"per sequence, got {tokens.shape[1]}")
        x = self.embeddings(tokens)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip_last]:
            x = layer(x)
        return self.final_layer_norm(x)
