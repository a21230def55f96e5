"""Configs of the DALL·E 2 family's parts (LDMConfig fields): the CLIP image encoder with its
preprocessing, and the diffusion prior (diffusers' `PriorTransformer`). Field names follow
transformers' `CLIPVisionConfig` / `CLIPImageProcessor` and diffusers' `PriorTransformer`, so the
folders' config.json files map 1:1. Kept out of config.py, which imports them."""
from __future__ import annotations

from dataclasses import dataclass

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EMBEDDINGS = ("context", "unclip")   # LDMConfig.image_embedding: how the decoder reads it


def _check(cfg, name: str, ok, allowed: str) -> None:
    value = getattr(cfg, name)
    if not ok(value):
        raise ValueError(f"{type(cfg).__name__}.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """CLIP ViT image tower with its projection (transformers `CLIPVisionModelWithProjection`; the
    SD 2.1-unclip original file holds it as open_clip's `visual`), and CLIP's preprocessing: resize
    the shortest side to image_size (bicubic, antialiased), centre crop, normalise."""
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"           # OpenAI CLIP ViT-L/14: quick_gelu; OpenCLIP ViT-H/14: gelu
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size",
                     "projection_dim"):
            _check(self, name, lambda v: v >= 1, ">= 1")
        _check(self, "num_heads", lambda v: self.hidden_size % v == 0, f"a divisor of hidden_size={self.hidden_size}")
        _check(self, "patch_size", lambda v: self.image_size % v == 0, f"a divisor of image_size={self.image_size}")
        _check(self, "hidden_act", lambda v: v in ("gelu", "quick_gelu"), "gelu or quick_gelu")
        for name in ("image_mean", "image_std"):
            _check(self, name, lambda v: len(v) == 3, "three numbers (R, G, B)")
        _check(self, "image_std", lambda v: min(v) > 0, "three numbers > 0")


@dataclass(frozen=True)
class ImageAdapterConfig:
    """An image-variation model's adapter (LDMConfig.image_adapter): an MLP maps the CLIP image
    embedding to `tokens` context tokens of the UNet's context width, as DALL·E 2's decoder projects it
    into extra context tokens, so that a text-to-image UNet reads an image in the tokens it already
    knows; the null condition is a stored context (the text encoder's "" where it came from one)."""
    tokens: int = 4
    hidden: int = 1024                 # the MLP's width (two hidden layers, GELU)

    def __post_init__(self):
        for name in ("tokens", "hidden"):
            _check(self, name, lambda v: v >= 1, ">= 1")


@dataclass(frozen=True)
class PriorConfig:
    """Karlo's diffusion prior (diffusers `PriorTransformer` in its unCLIP form: linear encoder_hid_proj,
    "prd" token, no norm_in): text embedding + text hidden states + noised image embedding + time ->
    image embedding. Its text encoder (CLIPTextModelWithProjection) and DDPM schedule are the
    LDMConfig's prior_text_encoder and prior_schedule."""
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77           # the text hidden states' length
    additional_embeddings: int = 4     # projected text embedding, time, noised image embedding, "prd"

    def __post_init__(self):
        for name in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"):
            _check(self, name, lambda v: v >= 1, ">= 1")
        _check(self, "additional_embeddings", lambda v: v == 4, "4 (Karlo's unCLIP prior)")


def check_embedding_parts(cfg) -> None:
    """LDMConfig's DALL·E 2 fields agree with each other and with the UNet (called by its __post_init__)."""
    kind, enc, prior = cfg.image_embedding, cfg.image_encoder, cfg.prior
    if cfg.image_adapter is not None and kind != "context":
        raise ValueError("LDMConfig.image_adapter belongs to an image-variation model (image_embedding: context)")
    if kind not in (None, *IMAGE_EMBEDDINGS):
        raise ValueError(f"LDMConfig.image_embedding must be null or one of {', '.join(IMAGE_EMBEDDINGS)}, got {kind!r}")
    if kind is None:
        if enc is not None or prior is not None or cfg.embedding_noise_schedule is not None or cfg.unet.adm_in_channels:
            raise ValueError("LDMConfig.image_encoder / prior / embedding_noise_schedule / unet.adm_in_channels "
                             "need image_embedding ('context' or 'unclip')")
        if cfg.text_encoder is None:
            raise ValueError("LDMConfig.text_encoder is null: only an image-variation model "
                             "(image_embedding: context) has no text encoder")
        return
    dims = {d for d in (enc and enc.projection_dim, prior and prior.embedding_dim) if d}
    if len(dims) > 1:
        raise ValueError(f"the image encoder's projection_dim and the prior's embedding_dim differ: {sorted(dims)}")
    if kind == "context":
        if prior is not None or cfg.unet.adm_in_channels or cfg.embedding_noise_schedule is not None:
            raise ValueError("an image-variation model (image_embedding: context) has no prior, "
                             "adm_in_channels nor embedding_noise_schedule")
        if cfg.text_encoder is not None and cfg.image_adapter is None:
            raise ValueError("an image-variation model (image_embedding: context) with a text encoder needs an "
                             "image_adapter: its text path and its image path share the UNet's context")
        if enc is None or (cfg.image_adapter is None and enc.projection_dim != cfg.unet.context_dim):
            raise ValueError(f"image_embedding: context needs an image_encoder whose projection_dim is the "
                             f"UNet's context_dim ({cfg.unet.context_dim}), or an image_adapter")
        return
    if cfg.text_encoder is None or cfg.embedding_noise_schedule is None:
        raise ValueError("a Stable unCLIP model (image_embedding: unclip) needs a text_encoder and an "
                         "embedding_noise_schedule")
    if not dims or cfg.unet.adm_in_channels != 2 * dims.pop():
        raise ValueError("a Stable unCLIP model needs an image_encoder or a prior, and unet.adm_in_channels = "
                         "2 × their embedding width (the noised embedding and its noise level's embedding)")
    if (prior is None) != (cfg.prior_text_encoder is None) or (prior is None) != (cfg.prior_schedule is None):
        raise ValueError("LDMConfig.prior, prior_text_encoder and prior_schedule go together")
