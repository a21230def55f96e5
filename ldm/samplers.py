"""Samplers: pure functions of (model_fn, x, schedule tensors) -> x0; no state, no set_timesteps.

`model_fn(x_t, t) -> model_output` (ε, v or x0 per `prediction_type`), t a (B,) tensor. Each sampler
reproduces one diffusers scheduler step for step, random draws included, so seeded results agree
with diffusers' pipelines. `sample()` is the one driver the pipeline calls. Names follow ComfyUI.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from .config import VARIANCE_TYPES, ScheduleConfig
from .schedule import (alphas_cumprod, check_prediction_type, dpm_solver_schedule, eps_and_x0_at,
                       euler_schedule, sampling_timesteps)
from .formats.diffusers_scheduler import karras_of, resolve

SAMPLERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m")
VP_SAMPLERS = ("ddpm", "ddim", "pndm")      # step on the integer timestep grid; no Karras σ's
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_eta(eta) -> None:
    """DDIM's η in [0, 1]: 0 deterministic, 1 ancestral; past 1 the step's σ_t(η) exceeds the noise
    left at the next level (√ of a negative number)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (0 = deterministic DDIM, 1 = ancestral), got {eta!r}")


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) shaped like x, drawn on the generator's device as diffusers' `randn_tensor` does."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (diffusers' sigma schedulers step in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _t_batch(t, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)  # (B,)


def _after_step(x, i: int, t, pred_x0, callback) -> None:
    """NaN/Inf guard (one reduction per step), then the progress callback."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"latents became NaN/Inf at step {i} (t={t}); run the model in float32 "
            "or use a lower guidance_scale")
    if callback is not None:
        callback(dict(i=i, t=t, x=x, pred_x0=pred_x0))


def _clipped(pred_x0: torch.Tensor, clip: float | None) -> torch.Tensor:
    """pred_x0 clamped to ±clip (DDPM/DDIM `clip_sample`; SD turns it off: latents aren't in [-1, 1])."""
    return pred_x0 if clip is None else pred_x0.clamp(-clip, clip)


def ddpm(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
         prediction_type: str = "epsilon", variance: str = "fixed_small", clip: float | None = None,
         generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) over descending `timesteps`, as DDPMScheduler.
    variance: "fixed_small" (β̃_t) | "fixed_large" (β_t); clip: pred_x0 clamped to ±clip."""
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCE_TYPES)}")
    ts = timesteps.tolist()
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        alpha_bar = float(alphas_cumprod[t])
        alpha_bar_prev = float(alphas_cumprod[prev]) if prev >= 0 else 1.0
        alpha = alpha_bar / alpha_bar_prev   # α_t, β_t of the strided chain
        beta = 1 - alpha
        out = model_fn(x, _t_batch(t, x, torch.long))
        pred_x0 = _clipped(eps_and_x0_at(out, x, alpha_bar, prediction_type)[1], clip)
        # DDPM eq. (7): posterior mean μ̃_t(x_t, x0)
        coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
        coef_xt = math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
        x_new = coef_x0 * pred_x0 + coef_xt * x
        if t > 0:  # diffusers-compat: noise whenever t > 0, also on the last step if steps_offset=1
            posterior_var = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20)  # DDPM eq. (7): β̃_t
            var = beta if variance == "fixed_large" else posterior_var
            x_new = x_new + math.sqrt(var) * _randn_like(out, generator)
        x = x_new
        _after_step(x, i, t, pred_x0, callback)
    return x


def ddim(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
         prediction_type: str = "epsilon", eta: float = 0.0, generator: torch.Generator | None = None,
         callback=None, stride: int | None = None, final_alpha: float | None = None,
         clip: float | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta=0 deterministic, eta=1 ancestral. alpha_t / alpha_prev are ᾱ
    (CompVis's a_t / a_prev) with alpha_prev read at t − stride, past the end `final_alpha` (default
    ᾱ_0, SD's set_alpha_to_one=False). stride defaults to T // len(timesteps) as diffusers; give the
    full schedule's for a suffix. clip: pred_x0 clamped to ±clip."""
    check_eta(eta)
    final_alpha = float(alphas_cumprod[0]) if final_alpha is None else final_alpha
    # diffusers-compat: t − T // S is the next timestep for "leading" spacing, off by up to a
    # stride's rounding for "trailing" / "linspace"
    stride = len(alphas_cumprod) // len(timesteps) if stride is None else stride
    for i, t in enumerate(timesteps.tolist()):
        prev = t - stride
        alpha_t = float(alphas_cumprod[t])
        alpha_prev = float(alphas_cumprod[prev]) if prev >= 0 else final_alpha
        out = model_fn(x, _t_batch(t, x, torch.long))
        eps, pred_x0 = eps_and_x0_at(out, x, alpha_t, prediction_type)
        pred_x0 = _clipped(pred_x0, clip)       # diffusers keeps the unclipped ε for the direction
        # DDIM eq. (16): σ_t(η)
        sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
        dir_xt = math.sqrt(1 - alpha_prev - sigma ** 2) * eps   # DDIM eq. (12): direction pointing to x_t
        x = math.sqrt(alpha_prev) * pred_x0 + dir_xt            # DDIM eq. (12)
        if eta > 0:
            x = x + sigma * _randn_like(out, generator)         # DDIM eq. (12): random noise
        _after_step(x, i, t, pred_x0, callback)
    return x


def pndm(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, *,
         prediction_type: str = "epsilon", final_alpha: float | None = None, callback=None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, the PNDM paper's pseudo linear multistep; CompVis `PLMSSampler`), as
    PNDMScheduler with skip_prk_steps: a 4th-order Adams–Bashforth combination of the last outputs,
    the first step taken twice (Euler, then with the mean of both outputs: Heun) to start the history.
    S steps cost S+1 model calls. The transfer is PNDM eq. (11), φ(x_t, ε, t, t−δ)."""
    final_alpha = float(alphas_cumprod[0]) if final_alpha is None else final_alpha
    stride = len(alphas_cumprod) // len(timesteps)
    ts = timesteps.tolist()
    # model calls at t_0, t_1, t_1, t_2, …: the second redoes step t_0 -> t_1 (diffusers' plms_timesteps)
    calls = ts[:1] + ts[1:2] + ts[1:]
    history: list[torch.Tensor] = []                  # past model outputs, newest last (at most 4)
    x_start = None
    for n, t_model in enumerate(calls):
        out = model_fn(x, _t_batch(t_model, x, torch.long))
        pred_x0 = eps_and_x0_at(out, x, float(alphas_cumprod[t_model]), prediction_type)[1]
        if n == 1:   # redo step 1 from x_T with the mean output (Heun); diffusers-compat: it runs
            # t_1 + stride -> t_1, which is t_0 -> t_1 only for "leading" spacing
            t, prev, x, combined = t_model + stride, t_model, x_start, (out + history[-1]) / 2
        else:
            t, prev, history = t_model, t_model - stride, (history + [out])[-4:]
            combined = _adams_bashforth(history)
        if n == 0:
            x_start = x
        # diffusers-compat: outputs are combined as they come (ε or v), then read as ε at this step
        eps = eps_and_x0_at(combined, x, float(alphas_cumprod[t]), prediction_type)[0]
        alpha_t = float(alphas_cumprod[t])
        alpha_prev = float(alphas_cumprod[prev]) if prev >= 0 else final_alpha
        # PNDM eq. (11): x_{t−δ} = √(ᾱ'/ᾱ) x − (ᾱ' − ᾱ) ε / (ᾱ √(1−ᾱ') + √(ᾱ (1−ᾱ) ᾱ'))
        denom = alpha_t * math.sqrt(1 - alpha_prev) + math.sqrt(alpha_t * (1 - alpha_t) * alpha_prev)
        x = math.sqrt(alpha_prev / alpha_t) * x - ((alpha_prev - alpha_t) / denom) * eps
        if n > 0 or len(ts) == 1:                     # the first call's Euler step is provisional
            _after_step(x, max(n - 1, 0), t, pred_x0, callback)
    return x


def _adams_bashforth(eps: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep combination of the last 1–4 outputs (newest last), PNDM eq. (12)."""
    if len(eps) == 1:
        return eps[-1]
    if len(eps) == 2:
        return (3 * eps[-1] - eps[-2]) / 2
    if len(eps) == 3:
        return (23 * eps[-1] - 16 * eps[-2] + 5 * eps[-3]) / 12
    return (55 * eps[-1] - 59 * eps[-2] + 37 * eps[-3] - 9 * eps[-4]) / 24


def _euler_step_input(model_fn, x, sigma: float, t, prediction_type):
    """Evaluate the VP model at x / √(σ²+1) (diffusers' scale_model_input); return pred_x0 in float32."""
    scale = math.sqrt(sigma ** 2 + 1)
    out = model_fn(x / scale, _t_batch(t, x, torch.float32))
    _, pred_x0 = eps_and_x0_at(out, _upcast(x) / scale, 1 / scale ** 2, prediction_type)  # ᾱ = 1/(1+σ²)
    return out, pred_x0


def euler(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
          prediction_type: str = "epsilon", callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1 minus Heun's correction), as
    EulerDiscreteScheduler; x = x0 + σ ε starts at noise · init σ, sigmas (S+1,) end in 0."""
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        out, pred_x0 = _euler_step_input(model_fn, x, sigma, t, prediction_type)
        d = (_upcast(x) - pred_x0) / sigma                       # Karras eq. (1), (3): dx/dσ = (x − D)/σ
        x = (_upcast(x) + d * (sigma_next - sigma)).to(out.dtype)
        _after_step(x, i, t, pred_x0, callback)
    return x


def euler_ancestral(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
                    prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                    callback=None) -> torch.Tensor:
    """Euler step down to σ_down, then fresh noise of std σ_up (k-diffusion `sample_euler_ancestral`,
    η = 1), as EulerAncestralDiscreteScheduler."""
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        out, pred_x0 = _euler_step_input(model_fn, x, sigma, t, prediction_type)
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = sigma_next ** 2 / sigma                    # = √(σ_next² − σ_up²)
        d = (_upcast(x) - pred_x0) / sigma                       # Karras eq. (1), (3)
        x = _upcast(x) + d * (sigma_down - sigma)
        x = (x + _randn_like(out, generator) * sigma_up).to(out.dtype)  # drawn on every step, as diffusers
        _after_step(x, i, t, pred_x0, callback)
    return x


def _vp(sigma: float):
    """(α, σ_vp, λ) of a VE level σ: α = 1/√(σ²+1), σ_vp = σ α, λ = log(α/σ_vp)."""
    alpha = 1 / math.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha, -math.log(sigma)


def dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor, *,
             prediction_type: str = "epsilon", callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint) in VP space, as DPMSolverMultistepScheduler
    (dpmsolver++, solver_order=2, final σ=0): first-order first and last steps."""
    pred_x0_prev, h_prev, last = None, None, len(timesteps) - 1
    for i, t in enumerate(timesteps.tolist()):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = _vp(sigma)
        out = model_fn(x, _t_batch(t, x, torch.long))
        _, pred_x0 = eps_and_x0_at(out, _upcast(x), alpha_s ** 2, prediction_type)
        if sigma_next == 0:
            x_new, h = pred_x0, None   # limit σ_t → 0 of the first-order update: x_t = x0
        else:
            alpha_t, sigma_t, lambda_t = _vp(sigma_next)
            h = lambda_t - lambda_s
            phi = math.expm1(-h)                                 # e^{−h} − 1
            # DPM-Solver++ first-order update (= DDIM): x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) x0
            x_new = (sigma_t / sigma_s) * _upcast(x) - (alpha_t * phi) * pred_x0
            if pred_x0_prev is not None and i < last:
                # DPM-Solver++(2M), Alg. 2: − ½ α_t (e^{−h} − 1) D1, D1 = (m0 − m1) / r, r = h_prev/h
                d1 = (1.0 / (h_prev / h)) * (pred_x0 - pred_x0_prev)
                x_new = x_new - 0.5 * (alpha_t * phi) * d1
        x = x_new.to(out.dtype)
        pred_x0_prev, h_prev = pred_x0, h
        _after_step(x, i, t, pred_x0, callback)
    return x


def _euler_init_sigma(sigmas: torch.Tensor, cfg: ScheduleConfig) -> float:
    """diffusers' init_noise_sigma: σ_max, or √(σ_max²+1) for "leading" spacing."""
    sigma_max = sigmas.max().item()
    return sigma_max if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(sigma_max ** 2 + 1)


def check_options(name: str, eta, karras) -> None:
    """The sampler's name and the options that only some samplers take, checked before any work."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    check_eta(eta)
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta only applies to the ddim sampler; got eta={eta} with {name!r}")
    if karras is not None and not isinstance(karras, bool):
        raise TypeError(f"karras must be True, False or None (the model's setting), got {karras!r}")
    if karras and name in VP_SAMPLERS:
        raise ValueError(f"karras=True applies to euler, euler_ancestral and dpmpp_2m, not {name!r}")


def sample(name: str, model_fn: ModelFn, noise: torch.Tensor, schedule: ScheduleConfig, num_steps: int, *,
           eta: float = 0.0, karras: bool | None = None, generator: torch.Generator | None = None,
           callback=None) -> torch.Tensor:
    """Run sampler `name` from unit-variance `noise` (B, C, h, w) for num_steps; returns x0 (B, C, h, w).
    Settings the schedule leaves unset take the defaults of the sampler's diffusers class; karras=None
    follows the schedule's use_karras_sigmas where that class reads it (formats/diffusers_scheduler.py).
    The callback gets dict(i, t, x, pred_x0) after each step, x being the updated latents."""
    check_options(name, eta, karras)
    schedule = resolve(schedule, name)
    karras = karras_of(schedule, name, karras)
    pt = schedule.prediction_type
    check_prediction_type(pt)
    if name in VP_SAMPLERS:
        ac, ts = alphas_cumprod(schedule), sampling_timesteps(num_steps, schedule)
        if name == "pndm" and ac[ts[0]] == 0:
            raise ValueError("PNDM's transfer divides by ᾱ_t, which is 0 at the first step with "
                             "rescale_betas_zero_snr; use ddim, euler or dpmpp_2m")
        if pt == "epsilon" and ac[ts[0]] == 0:
            raise ValueError(
                f"an epsilon-prediction model cannot give x0 at zero SNR (t={int(ts[0])} with "
                "rescale_betas_zero_snr); use a v_prediction model (Lin et al. 2023), "
                "timestep_spacing='leading', or the euler / dpmpp_2m samplers")
        clip = schedule.clip_sample_range if schedule.clip_sample else None
        final_alpha = 1.0 if schedule.set_alpha_to_one else None
        if name == "ddpm":
            return ddpm(model_fn, noise, ac, ts, prediction_type=pt, variance=schedule.variance_type,
                        clip=clip, generator=generator, callback=callback)
        if name == "pndm":
            if not schedule.skip_prk_steps:
                raise ValueError("the pndm sampler runs PLMS from the first step (skip_prk_steps=True, as "
                                 "SD's configs set); this model's scheduler asks for PRK warm-up steps, "
                                 "which ldm doesn't implement: name another sampler")
            return pndm(model_fn, noise, ac, ts, prediction_type=pt, final_alpha=final_alpha, callback=callback)
        return ddim(model_fn, noise, ac, ts, prediction_type=pt, eta=eta, generator=generator,
                    callback=callback, final_alpha=final_alpha, clip=clip)
    if name == "dpmpp_2m":
        ts, sigmas = dpm_solver_schedule(num_steps, schedule, karras=karras)
        return dpmpp_2m(model_fn, noise, sigmas, ts, prediction_type=pt, callback=callback)  # VP: x_T = noise
    ts, sigmas = euler_schedule(num_steps, schedule, karras=karras)
    x = noise * _euler_init_sigma(sigmas, schedule)   # (B, C, h, w), x = x0 + σ ε
    if name == "euler":
        return euler(model_fn, x, sigmas, ts, prediction_type=pt, callback=callback)
    return euler_ancestral(model_fn, x, sigmas, ts, prediction_type=pt, generator=generator,
                           callback=callback)
