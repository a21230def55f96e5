"""The discrete-time diffusion process: β schedules, ᾱ, q_sample, ε/x0/v conversions, the training
loss, and the inference timestep / σ grids that diffusers' schedulers build in `set_timesteps`
(ldm/grids.py packages them per family as the `Grid` a sampler walks).

Schedules are computed in float64 and cast once to the tensor's dtype (as CompVis does; diffusers
builds them in float32, so expect ~1e-6 relative differences against it).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, ScheduleConfig  # noqa: F401
from .formats.diffusers_scheduler import resolve



def make_beta_schedule(name: str, num_train_timesteps: int, beta_start: float = 0.00085,
                       beta_end: float = 0.012) -> torch.Tensor:
    """β_1..β_T as a float64 (T,) tensor."""
    T = num_train_timesteps
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if name == "scaled_linear":
        # SD-compat: CompVis calls this "linear": linspace(√β_start, √β_end)²
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if name == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. (17): ᾱ(u) = cos²((u + s)/(1 + s) · π/2), s = 0.008; β ≤ 0.999
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """β's whose ᾱ_T is exactly 0 (Lin et al. 2023, Alg. 1): shift √ᾱ so that its last value is 0 and
    scale it so that its first is unchanged. SD's schedule leaves √ᾱ_T ≈ 0.068 of the image in x_T,
    so a model learns to read the image mean from the noise; with 0 it must take it from the prompt."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].item(), sqrt_ab[-1].item()
    alpha_bar = ((sqrt_ab - last) * (first / (first - last))) ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float64 (T,); ᾱ_T = 0 with cfg.rescale_betas_zero_snr."""
    betas = make_beta_schedule(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _sigma_alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """ᾱ for the σ-space samplers: σ_T = √((1−ᾱ_T)/ᾱ_T) is infinite at zero terminal SNR, so
    diffusers (Euler, DPM-Solver) sets ᾱ_T = 2⁻²⁴ (σ_T = 4096); so do we, for parity."""
    ac = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = 2.0 ** -24
    return ac


# ---------------------------------------------------------------------------------------------
# q(x_t | x_0) and conversions between ε, x0 and v predictions


def check_prediction_type(prediction_type: str) -> None:
    """Raise ValueError naming the known prediction types."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                         f"choose one of {', '.join(PREDICTION_TYPES)}")


def _gather(alphas_cumprod: torch.Tensor, t, x: torch.Tensor):
    """ᾱ_t for an integer t (int, 0-dim or (B,) long tensor), shaped to broadcast against x."""
    if isinstance(t, int):
        return float(alphas_cumprod[t])
    if t.is_floating_point():
        raise ValueError(f"t must be an integer timestep tensor, got dtype {t.dtype}; "
                         "for fractional t interpolate with t_to_sigma")
    a = alphas_cumprod.to(t.device)[t]                     # (B,) float64
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))   # (B, 1, 1, 1)


def _coefs(alpha_bar, x: torch.Tensor):
    """(√ᾱ, √(1−ᾱ)) computed in float64 and cast once to x's dtype and device."""
    if isinstance(alpha_bar, torch.Tensor):
        a = alpha_bar.double()
        return a.sqrt().to(x), (1 - a).sqrt().to(x)
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM eq. (4))."""
    a, s = _coefs(_gather(alphas_cumprod, t, x0), x0)
    return a * x0 + s * noise


def training_noise(x0: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """ε for a training step: N(0, I), plus with `offset` > 0 a per-sample, per-channel constant
    offset·N(0, 1) ("offset noise", Guttenberg 2023). SD's schedule leaves signal at t = T, so a
    model trained on pure ε learns to read the image mean (here: the background colour) from the
    starting noise instead of from the prompt; the offset makes the mean something it must draw."""
    if offset < 0:
        raise ValueError(f"noise_offset must be >= 0 (0 turns it off), got {offset}")
    noise = torch.randn_like(x0)
    if offset:
        noise = noise + offset * torch.randn(x0.shape[0], x0.shape[1], *(1,) * (x0.ndim - 2),
                                             device=x0.device, dtype=x0.dtype)
    return noise


def eps_and_x0_at(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str):
    """(ε, pred_x0) from an ε, v or x0 prediction at noise level ᾱ (float or broadcastable tensor)."""
    a, s = _coefs(alpha_bar, x_t)
    if prediction_type == "epsilon":
        return model_output, (x_t - s * model_output) / a    # DDPM eq. (15)
    if prediction_type == "v_prediction":
        # v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022, §4)
        return a * model_output + s * x_t, a * x_t - s * model_output
    if prediction_type == "sample":
        return (x_t - a * model_output) / s, model_output
    check_prediction_type(prediction_type)


def to_eps_and_x0(model_output: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor,
                  prediction_type: str):
    """(ε, pred_x0) from a model output at integer timestep t; used by the samplers."""
    return eps_and_x0_at(model_output, x_t, _gather(alphas_cumprod, t, x_t), prediction_type)


def pred_x0_from_eps(eps, x_t, t, alphas_cumprod):
    """x0 = (x_t − √(1−ᾱ) ε) / √ᾱ."""
    return to_eps_and_x0(eps, x_t, t, alphas_cumprod, "epsilon")[1]


def eps_from_x0(x0, x_t, t, alphas_cumprod):
    """ε = (x_t − √ᾱ x0) / √(1−ᾱ)."""
    return to_eps_and_x0(x0, x_t, t, alphas_cumprod, "sample")[0]


def x0_from_v(v, x_t, t, alphas_cumprod):
    """x0 = √ᾱ x_t − √(1−ᾱ) v."""
    return to_eps_and_x0(v, x_t, t, alphas_cumprod, "v_prediction")[1]


def eps_from_v(v, x_t, t, alphas_cumprod):
    """ε = √ᾱ v + √(1−ᾱ) x_t."""
    return to_eps_and_x0(v, x_t, t, alphas_cumprod, "v_prediction")[0]


def v_target(x0, noise, t, alphas_cumprod):
    """v = √ᾱ ε − √(1−ᾱ) x0, the v-prediction training target."""
    a, s = _coefs(_gather(alphas_cumprod, t, x0), x0)
    return a * noise - s * x0


def diffusion_loss(model_output, x0, noise, t, alphas_cumprod, prediction_type: str,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean squared error against the ε, v or x0 target (DDPM Alg. 1 for ε), in float32. With
    snr_gamma > 0, Min-SNR-γ weighting (Hang et al. 2023): each sample's error counts as an x0 error
    weighted min(SNR, γ), so the easy low-noise steps stop dominating and training converges faster."""
    check_prediction_type(prediction_type)
    if snr_gamma < 0:
        raise ValueError(f"snr_gamma must be >= 0 (0 turns the weighting off), got {snr_gamma}")
    target = {"epsilon": lambda: noise, "sample": lambda: x0,
              "v_prediction": lambda: v_target(x0, noise, t, alphas_cumprod)}[prediction_type]()
    if not snr_gamma:
        return F.mse_loss(model_output.float(), target.float())
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)   # (B,)
    ac = _gather(alphas_cumprod, t, per_sample).float()                              # (B,)
    snr = ac / (1 - ac)
    # the x0 error equals the ε error / SNR, the v error / (SNR + 1), the x0 error itself; the ε
    # weight min(SNR, γ)/SNR is written as min(1, γ/SNR) to stay finite at zero terminal SNR
    weight = {"epsilon": (snr_gamma / snr).clamp(max=1.0),      # (B,) each: cheap, so no laziness
              "v_prediction": snr.clamp(max=snr_gamma) / (snr + 1),
              "sample": snr.clamp(max=snr_gamma)}[prediction_type]
    return (per_sample * weight).mean()


# ---------------------------------------------------------------------------------------------
# Inference timesteps (numpy, to reproduce diffusers' set_timesteps rounding bit for bit)


def _check_steps(num_steps: int, cfg: ScheduleConfig) -> None:
    T = cfg.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be between 1 and num_train_timesteps={T}, got {num_steps}")
    if cfg.timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {cfg.timestep_spacing!r}; "
                         f"choose one of {', '.join(TIMESTEP_SPACINGS)}")


def _spaced(n: int, cfg: ScheduleConfig, round_linspace: bool = True) -> np.ndarray:
    """n descending float64 timesteps by cfg.timestep_spacing (Lin et al. 2023, Table 2)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
    # trailing; [:n] drops the stray ~0 that float arange adds for some n (e.g. 61 of 1000),
    # which diffusers keeps as timestep -1
    return np.round(np.arange(T, 0, -T / n))[:n] - 1


def _checked(ts: np.ndarray, num_steps: int, cfg: ScheduleConfig) -> np.ndarray:
    if ts.min() < 0 or ts.max() > cfg.num_train_timesteps - 1:
        raise ValueError(
            f"{num_steps} steps with timestep_spacing={cfg.timestep_spacing!r} and steps_offset="
            f"{cfg.steps_offset} give timesteps {int(ts.max())}..{int(ts.min())}, outside "
            f"[0, {cfg.num_train_timesteps - 1}]; use fewer steps or timestep_spacing='trailing'")
    return ts


def sampling_timesteps(num_steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """(S,) long, descending: DDPMScheduler / DDIMScheduler / PNDMScheduler `set_timesteps`."""
    cfg = resolve(cfg, "ddim")
    _check_steps(num_steps, cfg)
    return torch.from_numpy(_checked(_spaced(num_steps, cfg), num_steps, cfg).astype(np.int64))


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1−ᾱ_t)/ᾱ_t), the VE noise level of each training timestep (ascending in t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """n σ's from sigma_max down to sigma_min, float64 (Karras et al. 2022, eq. (5))."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each σ: linear interpolation in log σ over the training σ's
    (diffusers `_sigma_to_t`, k-diffusion `DiscreteSchedule.sigma_to_t`)."""
    log_sigmas = sigmas.double().log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """σ at fractional timesteps t by linear interpolation (np.interp, as diffusers' Euler does)."""
    sigmas = sigmas.to(t.device, torch.float64)
    t = t.double().clamp(0, len(sigmas) - 1)
    low = t.floor().long().clamp(max=len(sigmas) - 2)
    w = t - low
    return (1 - w) * sigmas[low] + w * sigmas[low + 1]


def euler_schedule(num_steps: int, cfg: ScheduleConfig, karras: bool = False):
    """(timesteps (S,) float32, sigmas (S+1,) float64 ending in 0): EulerDiscreteScheduler's grid;
    "linspace" timesteps are fractional, Karras σ's span the spaced timesteps' σ range."""
    cfg = resolve(cfg, "euler")
    _check_steps(num_steps, cfg)
    ts = torch.from_numpy(_checked(_spaced(num_steps, cfg, round_linspace=False), num_steps, cfg))
    ts = ts.float()                                        # diffusers interpolates at float32 t
    train_sigmas = sigmas_from_alphas_cumprod(_sigma_alphas_cumprod(cfg))
    sigmas = t_to_sigma(ts, train_sigmas)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        ts = sigma_to_t(sigmas, train_sigmas)
    return ts.float(), torch.cat([sigmas, sigmas.new_zeros(1)])


def dpm_solver_timesteps(num_steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """(S,) long: DPMSolverMultistepScheduler spaces S+1 points and drops the last
    ("linspace", "leading"); "trailing" is as in sampling_timesteps."""
    cfg = resolve(cfg, "dpmpp_2m")
    _check_steps(num_steps, cfg)
    if cfg.timestep_spacing == "trailing":
        ts = _spaced(num_steps, cfg)
    else:
        ts = _spaced(num_steps + 1, cfg)[:-1]
    return torch.from_numpy(_checked(ts, num_steps, cfg).astype(np.int64))


def dpm_solver_schedule(num_steps: int, cfg: ScheduleConfig, karras: bool = False):
    """(timesteps (S,) long, sigmas (S+1,) float64 ending in 0): DPMSolverMultistepScheduler's
    grid; Karras σ's span the full training range and their timesteps are rounded."""
    ts = dpm_solver_timesteps(num_steps, cfg)
    train_sigmas = sigmas_from_alphas_cumprod(_sigma_alphas_cumprod(cfg))
    if karras:
        sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num_steps)
        t = sigma_to_t(sigmas, train_sigmas)
        # diffusers-compat: rounded, except for squaredcos_cap_v2 where the int cast truncates
        ts = (t if cfg.beta_schedule == "squaredcos_cap_v2" else t.round()).long()
    else:
        sigmas = train_sigmas[ts]
    return ts, torch.cat([sigmas, sigmas.new_zeros(1)])
