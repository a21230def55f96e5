"""Guidance as wrappers with the model function's signature `model_fn(x_t, t) -> output`.

Samplers never see guidance: each idea here turns a network (or a model function) into a new model
function (k-diffusion `CFGDenoiser`, sgm `Guider`), so wrappers stack.
"""
from __future__ import annotations

from typing import Callable

import torch

from .checks import as_float
from .schedule import sigmas_from_alphas_cumprod, t_to_sigma

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_guidance_rescale(guidance_rescale: float) -> float:
    return as_float(guidance_rescale, "guidance_rescale", 0, 1, hint=" (0 = off, 0.7 as in Lin et al. 2023)")


def rescale_cfg(guided: torch.Tensor, out_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, §3.4; diffusers' `rescale_noise_cfg`): give each sample the std of
    the conditional output (large scales overexpose), blended by φ to keep some detail."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (out_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def classifier_free(unet, context: torch.Tensor, uncond_context: torch.Tensor,
                    guidance_scale: float, guidance_rescale: float = 0.0) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): out_∅ + s (out_y − out_∅), one batched call.
    `unet(x, t, context)`; order [uncond, cond] as CompVis/diffusers. s == 1 skips the uncond half.
    guidance_rescale φ ∈ [0, 1] then applies `rescale_cfg`, only for s > 1 as diffusers does."""
    check_guidance_rescale(guidance_rescale)
    if context.shape != uncond_context.shape:
        raise ValueError(f"context {tuple(context.shape)} and uncond_context "
                         f"{tuple(uncond_context.shape)} must have the same shape")
    if guidance_scale == 1:
        return lambda x, t: unet(x, t, context)
    both_context = torch.cat([uncond_context, context])  # (2B, L, D)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(torch.cat([x, x]), torch.cat([t, t]), both_context)  # (2B, C, h, w)
        return combine_cfg(*out.chunk(2), guidance_scale, guidance_rescale)

    return model_fn


def combine_cfg(out_uncond: torch.Tensor, out_cond: torch.Tensor, guidance_scale: float,
                guidance_rescale: float = 0.0) -> torch.Tensor:
    """out_∅ + s (out_y − out_∅), then `rescale_cfg` for s > 1 and φ > 0 (as diffusers)."""
    guided = out_uncond + guidance_scale * (out_cond - out_uncond)
    if guidance_scale > 1 and guidance_rescale > 0:
        return rescale_cfg(guided, out_cond, guidance_rescale)
    return guided


def gradient_of(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ModelFn:
    """∇_x Σ score_fn(x_t, t) by autograd, also inside torch.no_grad(). score_fn returns (B,) scores,
    e.g. log p(y | x_t) of a noisy classifier or a CLIP image–text similarity (semantic guidance)."""
    def grad_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(score_fn(x_in, t).sum(), x_in)
        return grad                                                      # (B, C, h, w)
    return grad_fn


def _sqrt_one_minus_alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
    """√(1−ᾱ_t) shaped (B, 1, 1, 1); fractional t (Euler) via σ interpolated as diffusers does."""
    if t.is_floating_point():
        sigma = t_to_sigma(t, sigmas_from_alphas_cumprod(alphas_cumprod))
        alpha_bar = 1 / (1 + sigma ** 2)
    else:
        alpha_bar = alphas_cumprod.to(t.device)[t]
    s = (1 - alpha_bar).sqrt().to(x)                                     # (B,)
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def classifier_guidance(model_fn: ModelFn, grad_log_prob_fn: ModelFn, alphas_cumprod: torch.Tensor,
                        guidance_scale: float) -> ModelFn:
    """ε̂ = ε − s √(1−ᾱ_t) ∇_{x_t} log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2); model_fn must
    predict ε. grad_log_prob_fn(x_t, t) -> gradient, e.g. gradient_of(classifier or CLIP score)."""
    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_fn(x, t)
        grad = grad_log_prob_fn(x, t)
        return eps - guidance_scale * _sqrt_one_minus_alpha_bar(alphas_cumprod, t, x) * grad
    return guided
