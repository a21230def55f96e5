"""Semantic guidance: classifier guidance with any differentiable score of the *decoded* picture
(CLIP image–text similarity as in GLIDE's CLIP guidance and diffusers' CLIP-guided community
pipeline; image–image similarity to a reference), for latent models.

At each guided step, from the model's output at z_t: x̂0 = (z_t − √(1−ᾱ) ε̂) / √ᾱ, the picture
D(x̂0) through the VAE decoder (checkpointed: its activations are recomputed in the backward pass
instead of kept), g = ∇_{z_t} score(D(x̂0)), and ε̂ − s √(1−ᾱ) g as `classifier_guidance` does.
The gradient flows through x̂0's z_t only (∂x̂0/∂z_t = 1/√ᾱ, the UNet held fixed, as Dhariwal &
Nichol's classifier sees z_t only), or through the UNet too with `through_model=True` (the full
Jacobian of the posterior mean; memory of one UNet backward).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checks import as_float, as_int
from .guidance import ModelFn, alpha_bar_at
from .schedule import alphas_cumprod as schedule_alphas_cumprod
from .schedule import eps_and_x0_at

Score = Callable[[torch.Tensor], torch.Tensor]        # pictures (B, 3, H, W) in [-1, 1] -> (B,) scores

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)      # CLIP's pixel normalisation (open_clip's default)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def every_kth_step(k: int) -> Callable[[torch.Tensor], bool]:
    """A gate that is True on steps 0, k, 2k, … of a sampling run. A step is a new t; a t above the
    last one starts a new run (so one wrapper serves several generations in turn)."""
    k = as_int(k, "every", 1)
    state = {"t": None, "step": -1}

    def gate(t: torch.Tensor) -> bool:
        now = float(t.max())
        if state["t"] is None or now > state["t"]:
            state["step"] = 0                           # a new run
        elif now < state["t"]:
            state["step"] += 1
        state["t"] = now
        return state["step"] % k == 0
    return gate


def semantic_guidance(model_fn: ModelFn, score_fn: Score, decode: Callable[[torch.Tensor], torch.Tensor],
                      alphas_cumprod: torch.Tensor, guidance_scale: float, *, prediction_type: str = "epsilon",
                      every: int = 1, through_model: bool = False, checkpoint_decoder: bool = True) -> ModelFn:
    """model_fn guided up the gradient of score_fn(decode(x̂0)) w.r.t. z_t: the output's ε becomes
    ε − s √(1−ᾱ_t) ∇_{z_t} score, returned in the model's own parametrisation (ε, v or x0).
    decode: scaled latents -> pictures in [-1, 1] (e.g. `pipe.model.decode_first_stage`)."""
    scale = as_float(guidance_scale, "guidance_scale", 0)
    active = every_kth_step(every)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 0 or not active(t):
            return model_fn(x, t)
        alpha_bar = alpha_bar_at(alphas_cumprod, t, x)
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            if through_model:
                out = model_fn(z, t)
                eps, x0 = eps_and_x0_at(out, z, alpha_bar, prediction_type)  # (B, C, h, w)
            else:                                        # ε held fixed (not v): ∂x̂0/∂z_t = 1/√ᾱ
                out = model_fn(x, t).detach()
                eps = eps_and_x0_at(out, x, alpha_bar, prediction_type)[0]
                x0 = eps_and_x0_at(eps, z, alpha_bar, "epsilon")[1]
            pictures = checkpoint(decode, x0, use_reentrant=False) if checkpoint_decoder else decode(x0)
            (grad,) = torch.autograd.grad(score_fn(pictures).sum(), z)
        eps = eps.detach() - scale * (1 - alpha_bar).sqrt().to(x) * grad
        return _from_eps(eps.to(out.dtype), x, alpha_bar, prediction_type)
    return guided


def _from_eps(eps: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The model output that means ε at x_t (ε; v = √ᾱ ε − √(1−ᾱ) x0; x0)."""
    if prediction_type == "epsilon":
        return eps
    a, s = alpha_bar.sqrt().to(x), (1 - alpha_bar).sqrt().to(x)
    x0 = (x - s * eps) / a
    return a * eps - s * x0 if prediction_type == "v_prediction" else x0


def _pixels_for_clip(pictures: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[-1, 1] pictures -> CLIP's input: resized (bicubic, antialiased, differentiable) and normalised."""
    x = F.interpolate((pictures + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x - x.new_tensor(mean)[:, None, None]) / x.new_tensor(std)[:, None, None]


def _image_size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clip_text_score(model, tokenizer, prompts: list[str], *, mean=OPENAI_MEAN, std=OPENAI_STD) -> Score:
    """cos(E_img(picture_i), E_txt(prompt_i)) per picture, differentiable in the pictures; `model` an
    open_clip CLIP (encode_image / encode_text), `tokenizer` its tokenizer."""
    param = next(model.parameters())
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(list(prompts)).to(param.device)).float(), dim=-1)  # (B, E)
    size = _image_size(model)

    def score(pictures: torch.Tensor) -> torch.Tensor:
        image = model.encode_image(_pixels_for_clip(pictures, size, mean, std).to(param.dtype)).float()
        return (F.normalize(image, dim=-1) * text.to(image.device)).sum(-1)        # (B,)
    return score


def clip_image_score(model, reference: torch.Tensor, *, mean=OPENAI_MEAN, std=OPENAI_STD) -> Score:
    """cos(E_img(picture_i), E_img(reference_i)) — reference (B or 1, 3, H, W) in [-1, 1]."""
    size = _image_size(model)
    param = next(model.parameters())
    embed = lambda x: F.normalize(model.encode_image(_pixels_for_clip(x, size, mean, std).to(param.dtype)).float(),
                                  dim=-1)                                            # noqa: E731
    with torch.no_grad():
        target = embed(reference.to(param.device, torch.float32))                  # (B or 1, E)
    return lambda pictures: (embed(pictures) * target.to(pictures.device)).sum(-1)


def clip_guidance(pipe, score_fn: Score, guidance_scale: float, *, every: int = 1,
                  through_model: bool = False) -> Callable[[ModelFn], ModelFn]:
    """A wrapper for `pipe(prompt, guidance=[clip_guidance(pipe, score, s)])`: semantic guidance
    through the pipeline's own decoder, schedule and prediction type."""
    cfg = pipe.config
    decode = lambda z: pipe.model.decode_first_stage(z.to(pipe.dtype)).float()    # noqa: E731
    ac = schedule_alphas_cumprod(cfg.schedule)
    return lambda model_fn: semantic_guidance(model_fn, score_fn, decode, ac, guidance_scale,
                                              prediction_type=cfg.schedule.prediction_type, every=every,
                                              through_model=through_model)
