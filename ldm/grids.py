"""The grid a sampler walks, as data: one grid function per scheduler family builds it from the
schedule the way that family's diffusers class builds it in `set_timesteps` (ldm/schedule.py holds
the arithmetic). Karras spacing (Karras et al. 2022, eq. (5)) is an option of the σ grids, not of a
sampler: "dpmpp_2m_karras" is dpmpp_2m on `dpm_grid(..., karras=True)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .config import ScheduleConfig
from .formats.diffusers_scheduler import resolve
from .schedule import alphas_cumprod, dpm_solver_schedule, euler_schedule, q_sample, sampling_timesteps


@dataclass(frozen=True, eq=False)
class Grid:
    """timesteps: (S,) descending, the t the model is called at (long; float32 where diffusers' Euler
    interpolates fractional t). σ grids: sigmas (S+1,) float64 ending in 0. The VP grid: the ᾱ table,
    read at t and t − stride (DDIM's previous level), and stride = T // S, which a suffix of the grid
    (img2img) keeps. x_T = noise · init_sigma."""
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    stride: int = 0
    init_sigma: float = 1.0
    ve: bool = False              # x = x0 + σ ε (Euler's VE space), else VP: x = α x0 + σ α ε

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """x0 noised to the grid's level i (diffusers' `scheduler.add_noise` at that step)."""
        if self.sigmas is None:                                   # VP grid: DDPM eq. (4) at t_i
            return q_sample(x0, int(self.timesteps[i]), noise, self.alphas_cumprod)
        sigma = float(self.sigmas[i])
        if self.ve:
            return x0 + sigma * noise
        alpha = 1 / math.sqrt(sigma ** 2 + 1)
        return alpha * x0 + (sigma * alpha) * noise

    def last(self, num_steps: int, strength: float) -> "Grid":
        """The grid's last steps at this strength (img2img's, diffusers' `get_timesteps`)."""
        k = first_step(num_steps, strength)
        sigmas = None if self.sigmas is None else self.sigmas[k:]
        return self if k == 0 else replace(self, timesteps=self.timesteps[k:], sigmas=sigmas)

    def sigma_steps(self):
        """(i, t, σ, σ_next) per step of a σ grid, as Python numbers (t as the callback reports it)."""
        for i, t in enumerate(self.timesteps.tolist()):
            yield i, t, float(self.sigmas[i]), float(self.sigmas[i + 1])


def first_step(num_steps: int, strength: float) -> int:
    """Where img2img at `strength` starts: the last int(num_steps · strength) steps are run, as
    diffusers' `get_timesteps` cuts its scheduler's timesteps."""
    k = num_steps - min(int(num_steps * strength), num_steps)
    if k >= num_steps:
        raise ValueError(f"strength {strength} leaves no step of {num_steps} (int(steps · strength) = 0): "
                         f"raise strength or steps")
    return k


def vp_grid(num_steps: int, cfg: ScheduleConfig, karras: bool = False) -> Grid:
    """DDPM / DDIM / PNDM: integer training timesteps and ᾱ. No Karras variant: its σ's fall between
    training timesteps, which these schedulers' t-space steps can't take."""
    if karras:
        raise ValueError("the VP grid steps on training timesteps; Karras σ's need a σ grid (euler, dpm)")
    ac, ts = alphas_cumprod(cfg), sampling_timesteps(num_steps, cfg)
    return Grid(ts, alphas_cumprod=ac, stride=len(ac) // len(ts))


def pndm_grid(num_steps: int, cfg: ScheduleConfig, karras: bool = False) -> Grid:
    """PNDMScheduler's (skip_prk_steps) model calls: the VP grid with t_1 listed twice, t_0, t_1, t_1,
    t_2, …, the second call redoing the first step. img2img cuts this list, as diffusers does."""
    grid = vp_grid(num_steps, cfg, karras)
    ts = grid.timesteps
    return replace(grid, timesteps=torch.cat([ts[:1], ts[1:2], ts[1:]]))


def euler_grid(num_steps: int, cfg: ScheduleConfig, karras: bool = False) -> Grid:
    """EulerDiscreteScheduler's σ's and fractional t's; x_T = x0 + σ_max ε, and diffusers' init σ
    is √(σ_max²+1) for "leading" spacing."""
    cfg = resolve(cfg, "euler")
    ts, sigmas = euler_schedule(num_steps, cfg, karras=karras)
    sigma_max = sigmas.max().item()
    leading = cfg.timestep_spacing not in ("linspace", "trailing")
    return Grid(ts, sigmas, init_sigma=math.sqrt(sigma_max ** 2 + 1) if leading else sigma_max, ve=True)


def dpm_grid(num_steps: int, cfg: ScheduleConfig, karras: bool = False) -> Grid:
    """DPMSolverMultistepScheduler's integer t's and their σ's; it steps in VP space, x_T = noise."""
    ts, sigmas = dpm_solver_schedule(num_steps, cfg, karras=karras)
    return Grid(ts, sigmas)
