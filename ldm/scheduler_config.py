"""diffusers scheduler configs <-> ScheduleConfig and the model's default sampler."""
from __future__ import annotations

from .config import ScheduleConfig


def schedule_from_diffusers(d: dict) -> ScheduleConfig:
    return ScheduleConfig(
        num_train_timesteps=d.get("num_train_timesteps", 1000),
        beta_schedule=d.get("beta_schedule", "scaled_linear"),
        beta_start=float(d.get("beta_start", 0.00085)), beta_end=float(d.get("beta_end", 0.012)),
        prediction_type=d.get("prediction_type", "epsilon"),
        timestep_spacing=d.get("timestep_spacing", "leading"), steps_offset=d.get("steps_offset", 1),
        rescale_betas_zero_snr=bool(d.get("rescale_betas_zero_snr", False)))


def schedule_to_diffusers(cfg: ScheduleConfig) -> dict:
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": cfg.num_train_timesteps,
            "beta_schedule": cfg.beta_schedule, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
            "prediction_type": cfg.prediction_type, "timestep_spacing": cfg.timestep_spacing,
            "steps_offset": cfg.steps_offset, "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
            "clip_sample": False, "set_alpha_to_one": False}
