"""Samplers: pure functions of (model, x, grid, settings) -> x0; no state, no set_timesteps.

Two model contracts. The VP model `model_fn(x_t, t) -> model_output` (ε, v or x0 per
`prediction_type`), t a (B,) tensor, for the samplers whose diffusers parity needs t-space steps
(DDPM, DDIM, PNDM, and DPM-Solver++, which diffusers runs in VP space). k-diffusion's denoiser
`D(x, σ, t) -> x0` on x = x0 + σ ε for the σ-space ones (Euler), built once from model_fn by
`denoiser`. The grid (ldm/grids.py) is data built by the sampler's family; Karras σ's are a grid.
Each sampler reproduces one diffusers scheduler step for step, random draws included, so seeded
results agree with diffusers' pipelines. A sampler is one function and one `SAMPLERS` row; `sample()`
is the one driver the pipeline calls. Names follow ComfyUI.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .config import ScheduleConfig
from .grids import Grid, dpm_grid, euler_grid, first_step, pndm_grid, vp_grid
from .schedule import check_prediction_type, eps_and_x0_at
from .formats.diffusers_scheduler import karras_of, resolve

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Denoiser = Callable[[torch.Tensor, float, float], torch.Tensor]


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


def _after_step(x, i: int, t, pred_x0, callback, k: int | None = None, provisional: bool = False
                ) -> torch.Tensor:
    """NaN/Inf guard (one reduction per step), then the callback with k, the grid position of the
    step (i, but for PNDM's doubled first call, whose provisional first result isn't a step of its
    own); `sample` hands the step functions a callback that may return new latents (inpainting's
    blend), which the sampler goes on from."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"latents became NaN/Inf at step {i} (t={t}); run the model in float32 "
            "or use a lower guidance_scale")
    if callback is not None:
        new = callback(dict(i=i, t=t, x=x, pred_x0=pred_x0, k=i if k is None else k, provisional=provisional))
        return x if new is None else new
    return x


def denoiser(model_fn: ModelFn, prediction_type: str) -> Denoiser:
    """k-diffusion's D(x, σ) -> x0 (its CompVisDenoiser) from the VP model: x = x0 + σ ε is x_t/√ᾱ at
    ᾱ = 1/(1+σ²), so the model sees x / √(σ²+1) (diffusers' scale_model_input). It is called at the
    grid's t for σ, as diffusers does, not at σ's t recomputed. x0 in float32 at least."""
    def D(x: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
        scale = math.sqrt(sigma ** 2 + 1)
        out = model_fn(x / scale, _t_batch(t, x, torch.float32))
        return eps_and_x0_at(out, _upcast(x) / scale, 1 / scale ** 2, prediction_type)[1]
    return D


# --- VP samplers: model_fn(x_t, t) on integer t, the grid's ᾱ ----------------------------------

def _clipped(pred_x0: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """pred_x0 clamped to ±clip_sample_range (DDPM/DDIM `clip_sample`; SD turns it off: latents
    aren't in [-1, 1])."""
    clip = cfg.clip_sample_range
    return pred_x0.clamp(-clip, clip) if cfg.clip_sample else pred_x0


def _final_alpha(grid: Grid, cfg: ScheduleConfig) -> float:
    """ᾱ past the last DDIM/PNDM step: 1 with set_alpha_to_one, else ᾱ_0 (SD's configs)."""
    return 1.0 if cfg.set_alpha_to_one else float(grid.alphas_cumprod[0])


def _check_x0_at_start(grid: Grid, prediction_type: str) -> None:
    """x0 = (x_t − √(1−ᾱ) ε)/√ᾱ: an ε model can't give it at ᾱ = 0 (diffusers returns NaN)."""
    t = int(grid.timesteps[0])
    if prediction_type == "epsilon" and grid.alphas_cumprod[t] == 0:
        raise ValueError(
            f"an epsilon-prediction model cannot give x0 at zero SNR (t={t} with "
            "rescale_betas_zero_snr); use a v_prediction model (Lin et al. 2023), "
            "timestep_spacing='leading', or the euler / dpmpp_2m samplers")


def ddpm(model_fn: ModelFn, x: torch.Tensor, grid: Grid, cfg: ScheduleConfig, *,
         generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) over the grid, as DDPMScheduler; cfg.variance_type
    "fixed_small" (β̃_t) | "fixed_large" (β_t)."""
    _check_x0_at_start(grid, cfg.prediction_type)
    ac, ts = grid.alphas_cumprod, grid.timesteps.tolist()
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        alpha_bar = float(ac[t])
        alpha_bar_prev = float(ac[prev]) if prev >= 0 else 1.0
        alpha = alpha_bar / alpha_bar_prev   # α_t, β_t of the strided chain
        beta = 1 - alpha
        out = model_fn(x, _t_batch(t, x, torch.long))
        pred_x0 = _clipped(eps_and_x0_at(out, x, alpha_bar, cfg.prediction_type)[1], cfg)
        # DDPM eq. (7): posterior mean μ̃_t(x_t, x0)
        coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar)
        coef_xt = math.sqrt(alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)
        x_new = coef_x0 * pred_x0 + coef_xt * x
        if t > 0:  # diffusers-compat: noise whenever t > 0, also on the last step if steps_offset=1
            posterior_var = max((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 1e-20)  # DDPM eq. (7): β̃_t
            var = beta if cfg.variance_type == "fixed_large" else posterior_var
            x_new = x_new + math.sqrt(var) * _randn_like(out, generator)
        x = x_new
        x = _after_step(x, i, t, pred_x0, callback)
    return x


def ddim(model_fn: ModelFn, x: torch.Tensor, grid: Grid, cfg: ScheduleConfig, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta=0 deterministic, eta=1 ancestral. alpha_t / alpha_prev are ᾱ
    (CompVis's a_t / a_prev) with alpha_prev read at t − grid.stride, past the end `_final_alpha`."""
    check_eta(eta)
    _check_x0_at_start(grid, cfg.prediction_type)
    ac, final_alpha = grid.alphas_cumprod, _final_alpha(grid, cfg)
    for i, t in enumerate(grid.timesteps.tolist()):
        # diffusers-compat: t − T // S is the next timestep for "leading" spacing, off by up to a
        # stride's rounding for "trailing" / "linspace"
        prev = t - grid.stride
        alpha_t = float(ac[t])
        alpha_prev = float(ac[prev]) if prev >= 0 else final_alpha
        out = model_fn(x, _t_batch(t, x, torch.long))
        eps, pred_x0 = eps_and_x0_at(out, x, alpha_t, cfg.prediction_type)
        pred_x0 = _clipped(pred_x0, cfg)        # diffusers keeps the unclipped ε for the direction
        # DDIM eq. (16): σ_t(η)
        sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
        dir_xt = math.sqrt(1 - alpha_prev - sigma ** 2) * eps   # DDIM eq. (12): direction pointing to x_t
        x = math.sqrt(alpha_prev) * pred_x0 + dir_xt            # DDIM eq. (12)
        if eta > 0:
            x = x + sigma * _randn_like(out, generator)         # DDIM eq. (12): random noise
        x = _after_step(x, i, t, pred_x0, callback)
    return x


def pndm(model_fn: ModelFn, x: torch.Tensor, grid: Grid, cfg: ScheduleConfig, *, callback=None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, the PNDM paper's pseudo linear multistep; CompVis `PLMSSampler`), as
    PNDMScheduler with skip_prk_steps: a 4th-order Adams–Bashforth combination of the last outputs,
    the first step taken twice (Euler, then with the mean of both outputs: Heun) to start the history.
    S steps cost S+1 model calls. The transfer is PNDM eq. (11), φ(x_t, ε, t, t−δ). A cut grid
    (img2img) runs as diffusers runs a cut PNDMScheduler: the same counter logic on what is left."""
    ac, ts, pt, stride = grid.alphas_cumprod, grid.timesteps.tolist(), cfg.prediction_type, grid.stride
    if ac[ts[0]] == 0:
        raise ValueError("PNDM's transfer divides by ᾱ_t, which is 0 at the first step with "
                         "rescale_betas_zero_snr; use ddim, euler or dpmpp_2m")
    if not cfg.skip_prk_steps:
        raise ValueError("the pndm sampler runs PLMS from the first step (skip_prk_steps=True, as "
                         "SD's configs set); this model's scheduler asks for PRK warm-up steps, "
                         "which ldm doesn't implement: name another sampler")
    final_alpha = _final_alpha(grid, cfg)
    history: list[torch.Tensor] = []                  # past model outputs, newest last (at most 4)
    x_start = None
    for n, t_model in enumerate(ts):   # pndm_grid's t_0, t_1, t_1, t_2, …: call 1 redoes step 0
        out = model_fn(x, _t_batch(t_model, x, torch.long))
        pred_x0 = eps_and_x0_at(out, x, float(ac[t_model]), pt)[1]
        if n == 1:   # redo step 1 from x_T with the mean output (Heun); diffusers-compat: it runs
            # t_1 + stride -> t_1, which is t_0 -> t_1 only for "leading" spacing
            t, prev, x, combined = t_model + stride, t_model, x_start, (out + history[-1]) / 2
        else:
            t, prev, history = t_model, t_model - stride, (history + [out])[-4:]
            combined = _adams_bashforth(history)
        if n == 0:
            x_start = x
        # diffusers-compat: outputs are combined as they come (ε or v), then read as ε at this step
        eps = eps_and_x0_at(combined, x, float(ac[t]), pt)[0]
        alpha_t = float(ac[t])
        alpha_prev = float(ac[prev]) if prev >= 0 else final_alpha
        # PNDM eq. (11): x_{t−δ} = √(ᾱ'/ᾱ) x − (ᾱ' − ᾱ) ε / (ᾱ √(1−ᾱ') + √(ᾱ (1−ᾱ) ᾱ'))
        denom = alpha_t * math.sqrt(1 - alpha_prev) + math.sqrt(alpha_t * (1 - alpha_t) * alpha_prev)
        x = math.sqrt(alpha_prev / alpha_t) * x - ((alpha_prev - alpha_t) / denom) * eps
        # the first call's Euler step is provisional: call 1 redoes it (inpainting still blends it,
        # as diffusers, since call 1's model input is that result)
        x = _after_step(x, max(n - 1, 0), t, pred_x0, callback, k=n, provisional=n == 0 and len(ts) > 1)
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


# --- σ samplers ----------------------------------------------------------------------------------

def euler(D: Denoiser, x: torch.Tensor, grid: Grid, cfg: ScheduleConfig | None = None, *,
          callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1 minus Heun's correction), as
    EulerDiscreteScheduler; x = x0 + σ ε starts at noise · init σ, the grid's σ's end in 0. cfg is
    unused: D holds the prediction type."""
    for i, t, sigma, sigma_next in grid.sigma_steps():
        pred_x0 = D(x, sigma, t)
        d = (_upcast(x) - pred_x0) / sigma                       # Karras eq. (1), (3): dx/dσ = (x − D)/σ
        x = _upcast(x) + d * (sigma_next - sigma)
        x = _after_step(x, i, t, pred_x0, callback)
    return x


def euler_ancestral(D: Denoiser, x: torch.Tensor, grid: Grid, cfg: ScheduleConfig | None = None, *,
                    generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Euler step down to σ_down, then fresh noise of std σ_up (k-diffusion `sample_euler_ancestral`,
    η = 1), as EulerAncestralDiscreteScheduler."""
    for i, t, sigma, sigma_next in grid.sigma_steps():
        pred_x0 = D(x, sigma, t)
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = sigma_next ** 2 / sigma                    # = √(σ_next² − σ_up²)
        d = (_upcast(x) - pred_x0) / sigma                       # Karras eq. (1), (3)
        x = _upcast(x) + d * (sigma_down - sigma)
        x = x + _randn_like(pred_x0, generator) * sigma_up      # drawn on every step, as diffusers
        x = _after_step(x, i, t, pred_x0, callback)
    return x


def _vp(sigma: float):
    """(α, σ_vp, λ) of a VE level σ: α = 1/√(σ²+1), σ_vp = σ α, λ = log(α/σ_vp)."""
    alpha = 1 / math.sqrt(sigma ** 2 + 1)
    return alpha, sigma * alpha, -math.log(sigma)


def dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, grid: Grid, cfg: ScheduleConfig, *, callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, midpoint) in VP space on the grid's σ's, as
    DPMSolverMultistepScheduler (dpmsolver++, solver_order=2, final σ=0): first-order first and last
    steps. VP x and integer t, as diffusers (D's VE x would round differently)."""
    pred_x0_prev, h_prev, last = None, None, len(grid.timesteps) - 1
    for i, t, sigma, sigma_next in grid.sigma_steps():
        alpha_s, sigma_s, lambda_s = _vp(sigma)
        out = model_fn(x, _t_batch(t, x, torch.long))
        _, pred_x0 = eps_and_x0_at(out, _upcast(x), alpha_s ** 2, cfg.prediction_type)
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
        x = _after_step(x, i, t, pred_x0, callback)
    return x


# --- the registry and the driver -------------------------------------------------------------------

@dataclass(frozen=True)
class SamplerSpec:
    """One registry row: what `sample` needs to run a sampler."""
    step: Callable[..., torch.Tensor]  # step(model, x, grid, cfg, *, callback, [eta], [generator]) -> x0
    grid: Callable[..., Grid]          # its family's grid function: vp_grid, euler_grid or dpm_grid
    scheduler: str                     # the diffusers class it reproduces (a SCHEDULER_CLASSES key),
                                       # whose defaults `resolve` gives the settings a model leaves unset
    karras: bool = False               # its grid has Karras σ's (ComfyUI's `_karras` names)
    denoiser: bool = False             # its model is D(x, σ, t) -> x0, else the VP model_fn(x, t)
    eta: bool = False                  # takes DDIM's η
    generator: bool = False            # draws noise


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(ddpm, vp_grid, "ddpm", generator=True),
    "ddim": SamplerSpec(ddim, vp_grid, "ddim", eta=True, generator=True),
    "pndm": SamplerSpec(pndm, pndm_grid, "pndm"),
    "euler": SamplerSpec(euler, euler_grid, "euler", denoiser=True),
    "euler_ancestral": SamplerSpec(euler_ancestral, euler_grid, "euler_ancestral", denoiser=True, generator=True),
    "dpmpp_2m": SamplerSpec(dpmpp_2m, dpm_grid, "dpmpp_2m"),
}
# ComfyUI's names for the σ samplers on Karras σ's: euler_karras, euler_ancestral_karras, dpmpp_2m_karras
SAMPLERS.update({f"{name}_karras": replace(spec, karras=True) for name, spec in SAMPLERS.items()
                 if spec.grid in (euler_grid, dpm_grid)})


def check_options(name: str, eta, karras) -> None:
    """The sampler's name and the options that only some samplers take, checked before any work.
    karras=True/False is an alias for the `_karras` name (or its absence)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    check_eta(eta)
    if eta != 0 and not SAMPLERS[name].eta:
        takers = ", ".join(n for n, s in SAMPLERS.items() if s.eta)
        raise ValueError(f"eta only applies to the {takers} sampler; got eta={eta} with {name!r}")
    if karras is not None and not isinstance(karras, bool):
        raise TypeError(f"karras must be True, False or None (the model's setting), got {karras!r}")
    if karras and not SAMPLERS[name].karras and f"{name}_karras" not in SAMPLERS:
        bases = ", ".join(n for n in SAMPLERS if f"{n}_karras" in SAMPLERS)
        raise ValueError(f"karras=True applies to {bases} (and their _karras names), not {name!r}")
    if karras is False and SAMPLERS[name].karras:
        raise ValueError(f"{name!r} walks Karras σ's by name, which karras=False contradicts: "
                         f"name {name.removesuffix('_karras')!r} instead")


def steps_run(name: str, num_steps: int, strength: float) -> int:
    """How many steps `sample(name, …, strength=strength)` takes."""
    return num_steps - first_step(num_steps, strength)


def effective_name(name: str, schedule: ScheduleConfig, karras: bool | None = None) -> str:
    """The registry name `sample(name, …, karras=karras)` runs, e.g. "dpmpp_2m_karras": karras=None
    follows the schedule's use_karras_sigmas where the sampler's diffusers class reads it. What a
    record of the settings should name; pass `sample` the name and karras as given, not this."""
    check_options(name, 0.0, karras)
    spec = SAMPLERS[name]
    return name if spec.karras or not karras_of(schedule, spec.scheduler, karras) else f"{name}_karras"


def sample(name: str, model_fn: ModelFn, noise: torch.Tensor, schedule: ScheduleConfig, num_steps: int, *,
           eta: float = 0.0, karras: bool | None = None, generator: torch.Generator | None = None,
           callback=None, init: torch.Tensor | None = None, strength: float = 1.0,
           keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Run sampler `name` from unit-variance `noise` (B, C, h, w) for num_steps; returns x0 (B, C, h, w).
    Settings the schedule leaves unset take the defaults of the sampler's diffusers class; karras picks
    the `_karras` row, None following the schedule as `effective_name` says (formats/diffusers_scheduler.py).
    The callback gets dict(i, t, x, pred_x0) after each step, x being the updated latents.
    Image conditioning, as diffusers' img2img / inpaint pipelines: `strength` < 1 runs only the last
    int(num_steps · strength) steps (SDEdit); `init` latents start there noised by `noise` (else the
    noise alone starts, at the grid's init σ); `keep` = (known latents, mask) puts the known latents,
    noised to the next step's level, back where mask == 0 after every step (4-channel inpainting)."""
    check_options(name, eta, karras)
    spec = SAMPLERS[effective_name(name, schedule, karras)]
    cfg = resolve(schedule, spec.scheduler)
    check_prediction_type(cfg.prediction_type)
    grid = spec.grid(num_steps, cfg, karras=spec.karras).last(num_steps, strength)
    x = noise * grid.init_sigma if init is None else grid.noised(init, noise, 0)
    callback = _each_step(callback, None if keep is None else _blend(grid, *keep, noise))
    model = denoiser(model_fn, cfg.prediction_type) if spec.denoiser else model_fn
    options = dict(eta=eta) if spec.eta else {}
    if spec.generator:
        options["generator"] = generator
    return spec.step(model, x, grid, cfg, callback=callback, **options)


def _each_step(callback, blend):
    """What the step functions call after each step: the user's callback (steps only, not PNDM's
    provisional first result), then the blend, whose latents the sampler goes on from."""
    if blend is None and callback is None:
        return None

    def after(d: dict):
        if callback is not None and not d["provisional"]:
            callback(d)
        return None if blend is None else blend(d)
    return after


def _blend(grid: Grid, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
    """(1 − mask) · known noised to the next grid level (clean after the last step) + mask · x, as
    diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet."""
    last = len(grid.timesteps) - 1

    def blend(d: dict) -> torch.Tensor:
        k, x = d["k"], d["x"]
        proper = known if k == last else grid.noised(known, noise, k + 1)
        return ((1 - mask) * proper + mask * x).to(x.dtype)
    return blend
