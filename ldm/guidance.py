"""Guidance: how the network's outputs at a step become the one output the sampler sees.

Three places, one signature each, so guidance ideas stack as data instead of new parameters:
- a *branch* `branch(x, t) -> Rows` says which conditional rows a step runs (the prompt's own, or
  regional prompts' box rows, ldm/regions.py) and how their outputs make one per image;
- `classifier_free` puts the null rows under the branch's rows in ONE batched UNet call and mixes
  the two outputs by a *combine* rule `(out_∅, out_y) -> out` (`cfg`, wrapped by `rescaled`);
- *wrappers* `model_fn -> model_fn` change what the sampler sees (classifier and CLIP guidance:
  `classifier_guidance`), as k-diffusion's `CFGDenoiser` and sgm's `Guider` stack.
`only_from(t0, early, late)` is the one "at the noisy steps t ≥ t0 only" gate for any of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .checks import as_float
from .schedule import sigmas_from_alphas_cumprod, t_to_sigma

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]                # (x_t, t) -> output
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x_t, t, context) -> output
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]                # (out_∅, out_y) -> output


def _same(out: torch.Tensor) -> torch.Tensor:
    return out


@dataclass(frozen=True)
class Rows:
    """The conditional rows of one step's batched UNet call, and how their outputs become one
    output per image (`read`)."""
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    read: Callable[[torch.Tensor], torch.Tensor] = field(default=_same)


Branch = Callable[[torch.Tensor, torch.Tensor], Rows]


def prompt_rows(context: torch.Tensor) -> Branch:
    """The plain branch: one row per image, conditioned on its prompt's context (B, L, D)."""
    return lambda x, t: Rows(x, t, context)


def only_from(t0: float, early, late):
    """early(x, t) at the steps with t ≥ t0, late(x, t) after: for model functions and branches."""
    return lambda x, t: early(x, t) if float(t.max()) >= t0 else late(x, t)


def with_channels(model_fn: ModelFn, *extra: torch.Tensor) -> ModelFn:
    """Extra inputs (B, C_i, h, w) concatenated to x's channels on every call (GLIDE's and SD's
    inpainting [x, mask, masked-image latents], the upscaler's low-res image); the batched CFG rows
    carry them too. Inside the samplers' input scaling, as diffusers concatenates after it."""
    return lambda x, t: model_fn(torch.cat([x, *extra], dim=1), t)


def check_guidance_rescale(guidance_rescale: float) -> float:
    return as_float(guidance_rescale, "guidance_rescale", 0, 1, hint=" (0 = off, 0.7 as in Lin et al. 2023)")


def cfg(guidance_scale: float, guidance_rescale: float = 0.0) -> Combine:
    """Classifier-free guidance's rule (Ho & Salimans 2022): out_∅ + s (out_y − out_∅); with
    φ = guidance_rescale > 0 `rescaled`, only when guiding (s > 1) as diffusers."""
    check_guidance_rescale(guidance_rescale)
    rule = lambda out_uncond, out_cond: out_uncond + guidance_scale * (out_cond - out_uncond)  # noqa: E731
    return rescaled(rule, guidance_rescale) if guidance_scale > 1 and guidance_rescale > 0 else rule


def rescale_cfg(guided: torch.Tensor, out_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, §3.4; diffusers' `rescale_noise_cfg`): give each sample the std of
    the conditional output (large scales overexpose), blended by φ to keep some detail."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (out_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def rescaled(combine: Combine, guidance_rescale: float) -> Combine:
    """`combine`, then `rescale_cfg` by φ ∈ [0, 1]."""
    check_guidance_rescale(guidance_rescale)
    return lambda out_uncond, out_cond: rescale_cfg(combine(out_uncond, out_cond), out_cond, guidance_rescale)


def classifier_free(unet: UNetFn, prompt: torch.Tensor | Branch, uncond_context: torch.Tensor,
                    guidance_scale: float, combine: Combine | None = None) -> ModelFn:
    """The guided model function: ONE batched `unet(x, t, context)` call per step of [null rows (B),
    the branch's rows], mixed by `combine` (default `cfg(guidance_scale)`). `prompt`: the prompt
    contexts (B, L, D), or a branch. Order [uncond, cond] as CompVis/diffusers; s == 1 runs the
    branch's rows alone."""
    if isinstance(prompt, torch.Tensor):
        if prompt.shape != uncond_context.shape:
            raise ValueError(f"context {tuple(prompt.shape)} and uncond_context "
                             f"{tuple(uncond_context.shape)} must have the same shape")
        prompt = prompt_rows(prompt)
    combine = cfg(guidance_scale) if combine is None else combine

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = prompt(x, t)
        if guidance_scale == 1:
            return rows.read(unet(rows.x, rows.t, rows.context))
        out = unet(torch.cat([x, rows.x]), torch.cat([t, rows.t]), torch.cat([uncond_context, rows.context]))
        out_uncond, out_rows = out.split([len(x), len(rows.x)])
        return combine(out_uncond, rows.read(out_rows))

    return model_fn


def gradient_of(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ModelFn:
    """∇_x Σ score_fn(x_t, t) by autograd, also inside torch.no_grad(). score_fn returns (B,) scores,
    e.g. log p(y | x_t) of a noisy classifier or a CLIP image–text similarity (semantic guidance)."""
    def grad_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(score_fn(x_in, t).sum(), x_in)
        return grad                                                      # (B, C, h, w)
    return grad_fn


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ᾱ_t in float64 shaped (B, 1, 1, 1) against x; fractional t (Euler) via σ interpolated as diffusers does."""
    if t.is_floating_point():
        sigma = t_to_sigma(t, sigmas_from_alphas_cumprod(alphas_cumprod))
        alpha_bar = 1 / (1 + sigma ** 2)
    else:
        alpha_bar = alphas_cumprod.to(t.device)[t]
    alpha_bar = alpha_bar.double()
    return alpha_bar.reshape(alpha_bar.shape + (1,) * (x.ndim - alpha_bar.ndim))


def _sqrt_one_minus_alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
    """√(1−ᾱ_t) shaped (B, 1, 1, 1) in x's dtype."""
    return (1 - alpha_bar_at(alphas_cumprod, t, x)).sqrt().to(x)


def classifier_guidance(model_fn: ModelFn, grad_log_prob_fn: ModelFn, alphas_cumprod: torch.Tensor,
                        guidance_scale: float) -> ModelFn:
    """ε̂ = ε − s √(1−ᾱ_t) ∇_{x_t} log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2); model_fn must
    predict ε. grad_log_prob_fn(x_t, t) -> gradient, e.g. gradient_of(classifier or CLIP score)."""
    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model_fn(x, t)
        grad = grad_log_prob_fn(x, t)
        return eps - guidance_scale * _sqrt_one_minus_alpha_bar(alphas_cumprod, t, x) * grad
    return guided


def check_classifier_scale(pipe, scale) -> float:
    """classifier_scale as a float ≥ 0; > 0 needs a classifier attached to the pipeline (an object
    with `.guidance(pipe, prompts, scale) -> wrapper`, e.g. ldm.shapes.noisy_classifier.attach) and
    an ε-prediction model."""
    from .checks import as_float
    scale = as_float(scale, "classifier_scale", 0, hint=" (0 = no classifier guidance)")
    if scale and getattr(pipe, "classifier", None) is None:
        raise ValueError("classifier_scale > 0 needs a noisy classifier attached to the pipeline: for the "
                         "default model, ldm.shapes.noisy_classifier.attach(pipe, 'classifier.safetensors') "
                         "(train one with train_classifier.py)")
    if scale and pipe.config.schedule.prediction_type != "epsilon":
        raise ValueError(f"classifier guidance here shifts ε; this model predicts "
                         f"{pipe.config.schedule.prediction_type}")
    return scale
