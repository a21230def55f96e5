"""Image-embedding conditioning (the DALL·E 2 family) as data for the one sampling loop: a
`Condition` is the decoder's conditioning drawn before the latents, in diffusers' order of random
draws. Image variations (`image_embedding: "context"`): the CLIP image embedding is the one
cross-attention token, the null condition the zero embedding (diffusers); or, with an image_adapter
(ours), an MLP maps it to several tokens, the null condition a stored context. Stable unCLIP ("unclip"): the
embedding, normalised by the stored mean/std, noised to `noise_level` by its own DDPM schedule and
un-normalised, concatenated with the sinusoidal embedding of `noise_level`, is the UNet's class
vector (`adm_in_channels`); the null condition is the all-zero vector. The embedding comes from
the image (the CLIP encoder) or from the text (the prior, ldm/prior.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .image_encoder import ImageEncoder, LazyImageEncoder, built_image_encoder
from .layers import timestep_embedding
from .schedule import alphas_cumprod, q_sample


@dataclass(frozen=True)
class Condition:
    """What the decoder is conditioned on besides (or instead of) the prompt, one row per image:
    `context` (N, L, D) replaces the prompt's, its null `null_context` (None: zeros); `vector` (N, K)
    is the UNet's class vector (its null: zeros)."""
    context: torch.Tensor | None = None
    vector: torch.Tensor | None = None
    null_context: torch.Tensor | None = None


class NoiseAugmentor(nn.Module):
    """SD 2.1-unclip's `noise_augmentor`: the CLIP embedding statistics (diffusers' image_normalizer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("data_mean", torch.zeros(1, dim))
        self.register_buffer("data_std", torch.ones(1, dim))

    def forward(self, embeds: torch.Tensor, level, noise: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> (B, 2D): noised at `level` (an int, or (B,) levels in training), then
        [embedding, level's embedding]."""
        mean, std = self.data_mean.to(embeds), self.data_std.to(embeds)
        t = torch.as_tensor(level, device=embeds.device).expand(len(embeds))
        noised = q_sample((embeds - mean) * 1.0 / std, t, noise, ac.to(embeds.device)) * std + mean
        return torch.cat([noised, timestep_embedding(t, embeds.shape[1]).to(embeds.dtype)], dim=1)


class ImageAdapter(nn.Module):
    """An image-variation model's embedding -> context tokens (LDMConfig.image_adapter): a two-hidden-layer
    GELU MLP to tokens × context_dim, and the stored null context CFG draws against."""

    def __init__(self, cfg):
        super().__init__()
        a, width = cfg.image_adapter, cfg.unet.context_dim
        self.shape = (a.tokens, width)
        self.proj = nn.Sequential(nn.Linear(cfg.image_encoder.projection_dim, a.hidden), nn.GELU(),
                                  nn.Linear(a.hidden, a.hidden), nn.GELU(), nn.Linear(a.hidden, a.tokens * width))
        self.register_buffer("null_context", torch.zeros(a.tokens, width))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, tokens, context_dim)."""
        return self.proj(embeds).reshape(len(embeds), *self.shape)


def build_parts(model: nn.Module, cfg) -> None:
    """The LatentDiffusion's DALL·E 2 parts, under their SD 2.1-unclip names where it has them."""
    if cfg.image_encoder is not None:    # a text model's tower for variations is built when first used
        lazy = cfg.image_adapter is not None and cfg.text_encoder is not None
        model.embedder = (LazyImageEncoder if lazy else ImageEncoder)(cfg.image_encoder)
    if cfg.image_adapter is not None:
        model.image_adapter = ImageAdapter(cfg)
    if cfg.image_embedding == "unclip":
        model.noise_augmentor = NoiseAugmentor(cfg.unet.adm_in_channels // 2)
    if cfg.prior is not None:
        from .prior import DiffusionPrior
        model.prior = DiffusionPrior.of_model(cfg)


def image_embeddings(pipe, images) -> torch.Tensor:
    """PIL image(s) -> (B, D) CLIP image embeddings in the pipeline's dtype."""
    if getattr(pipe.model, "embedder", None) is None:
        raise ValueError("this model has no image encoder (image_encoder in its config): it can't embed images")
    return built_image_encoder(pipe.model).embed(images, pipe.device).to(pipe.dtype)


def embedding_condition(pipe, req, generator: torch.Generator) -> Condition | None:
    """The request's Condition, drawn from `generator` in diffusers' order: the prior's draws (text
    to image embedding), then the embedding noise (unclip; even at noise_level 0). Rows: one per
    image (req.prompts), source image i ↔ prompt i. None for a model without image embeddings."""
    kind, n = pipe.config.image_embedding, len(req.prompts)
    if kind is None or kind == "context" and req.embedding_images is None and not req.use_prior:
        return None                                                      # (the text path of a model with both)
    if req.embedding_images is not None:
        embeds = image_embeddings(pipe, req.embedding_images)                        # (P, D)
    else:                                                                            # text -> prior
        prior = pipe.prior if req.use_prior else pipe.model.prior                    # attached, or the model's
        embeds = prior.sample(req.prompts, req.prior_steps, req.prior_guidance_scale, generator,
                              pipe.device).to(pipe.dtype)                            # (N, D)
    if kind == "context":
        per_row = embeds.repeat_interleave(n // len(embeds), 0)                          # (N, D)
        adapter = getattr(pipe.model, "image_adapter", None)
        if adapter is None:
            return Condition(context=per_row[:, None])                                   # (N, 1, D)
        return Condition(context=adapter(per_row), null_context=adapter.null_context.expand(n, -1, -1))
    noise = torch.randn(embeds.shape, generator=generator, device=generator.device).to(embeds)
    ac = alphas_cumprod(pipe.config.embedding_noise_schedule)
    vector = pipe.model.noise_augmentor(embeds.float(), req.noise_level, noise.float(), ac)
    return Condition(vector=vector.to(pipe.dtype).repeat_interleave(n // len(embeds), 0))  # (N, 2D)


def class_vector_unet(unet, dtype, vector: torch.Tensor):
    """unet(x, t, context) with the class vector of each row: the image's for the conditional rows,
    zeros for CFG's null rows (batched as [null, conditional], ldm/guidance.py)."""
    def fn(x, t, c):
        y = vector if len(x) == len(vector) else torch.cat([torch.zeros_like(vector), vector])
        return unet(x.to(dtype), t, c, y=y).float()
    return fn


def check_embedding_inputs(cfg, prompt, image, mask_image, strength, noise_level, prior_steps,
                           prior_guidance_scale, use_prior: bool = False, prior_schedule=None) -> tuple:
    """(prompt, the Request fields of the embedding) for a model with image_embedding, checked before
    any work. Variations: image= is required and prompt is not taken (there is no text encoder, or, for
    a text model with an image adapter, a prompt means its text path, checked before this; each image
    gets "" as its record's prompt). unCLIP: a prompt (or none with image=: "" per image, as
    diffusers), and image= or a prior (text -> image embedding); noise_level in [0, T) of the
    embedding's noising schedule (default 0, as diffusers). use_prior (a text model with an image adapter
    and an attached prior, whose `prior_schedule` bounds prior_steps; or unCLIP): the prompt alone, the
    prior draws the embedding."""
    from .checks import as_int
    from .image_encoder import as_rgb_images
    kind = cfg.image_embedding
    given = [n for n, v in (("mask_image", mask_image), ("strength", strength)) if v is not None]
    if given:
        raise ValueError(f"{given[0]} is not taken by an image-embedding model (image variations / unCLIP): "
                         f"image= is the picture whose CLIP embedding conditions the drawing")
    if use_prior and image is not None:
        raise ValueError("use_prior=True draws the image embedding from the prompt: leave image= out "
                         "(or use_prior out, to vary the image)")
    images = None if image is None else as_rgb_images(image)
    if kind == "context" and use_prior:
        if noise_level is not None:
            raise ValueError("noise_level applies to Stable unCLIP models, not to a prior feeding an image adapter")
        if prompt is None:
            raise ValueError("use_prior=True draws from a prompt: give one")
        return prompt, dict(**_prior_settings(prior_schedule, prior_steps, prior_guidance_scale), use_prior=True)
    if kind == "context":
        if images is None:
            raise ValueError("this is an image-variation model: pass image= (a PIL RGB image or a list of them)")
        if prompt not in (None, "") and prompt != [""] * len(images):
            raise ValueError("this image-variation model has no text encoder: it draws from the image alone; "
                             "leave prompt out")
        if noise_level is not None or prior_steps is not None or prior_guidance_scale is not None:
            raise ValueError("noise_level / prior_steps / prior_guidance_scale apply to Stable unCLIP models, "
                             "not to an image-variation model")
        return [""] * len(images), dict(embedding_images=images)
    if images is None and cfg.prior is None:
        raise ValueError("this Stable unCLIP model has no prior: pass image= (the picture to vary)")
    if images is None and prompt is None:
        raise ValueError("give a prompt (the prior draws its image embedding) or image= (variations)")
    if prompt is None:                   # variations: "" for each image, as StableUnCLIPImg2ImgPipeline
        prompt = [""] * len(images)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if images is not None and isinstance(prompts, (list, tuple)) and len(images) not in (1, len(prompts)):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
    T = cfg.embedding_noise_schedule.num_train_timesteps
    level = as_int(0 if noise_level is None else noise_level, "noise_level", 0, T - 1,
                   hint=" (how much the image embedding is noised; 0 = none, as diffusers)")
    if images is not None and (prior_steps is not None or prior_guidance_scale is not None):
        raise ValueError("prior_steps / prior_guidance_scale apply when the prior draws the embedding from "
                         "the text: leave them out with image=")
    prior = _prior_settings(cfg.prior_schedule, prior_steps, prior_guidance_scale) if images is None else {}
    return prompt, dict(embedding_images=images, noise_level=level, **prior)


def _prior_settings(schedule, prior_steps, prior_guidance_scale) -> dict:
    """prior_steps (at most the prior schedule's timesteps) / prior_guidance_scale checked, defaulting to
    diffusers' (25, 4.0)."""
    from .checks import as_float, as_int
    from .prior import PRIOR_GUIDANCE_SCALE, PRIOR_STEPS
    steps = as_int(PRIOR_STEPS if prior_steps is None else prior_steps, "prior_steps", 1, schedule.num_train_timesteps)
    scale = as_float(PRIOR_GUIDANCE_SCALE if prior_guidance_scale is None else prior_guidance_scale,
                     "prior_guidance_scale", 0, hint=" (1 = no guidance)")
    return dict(prior_steps=steps, prior_guidance_scale=scale)
