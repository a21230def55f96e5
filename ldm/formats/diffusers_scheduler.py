"""diffusers scheduler configs <-> ScheduleConfig and the model's default sampler, with diffusers'
rule for what a config leaves unset.

diffusers users switch samplers with `Cls.from_config(pipe.scheduler.config)`. A key the folder's
`scheduler_config.json` does not set (absent, or listed in `_use_default_values`) then takes the
default *of the class it is loaded into*: the real SD 1.5 / 2.1 configs set no `timestep_spacing`,
so DDIM, DDPM and PNDM space "leading" while Euler and DPM-Solver++ space "linspace". ScheduleConfig
keeps such keys None ("not set") and `resolve` fills them in per sampler, so every sampler draws
what its diffusers namesake draws from the same folder. Every key of a folder's config is either
honoured or refused with a message naming it; none is dropped.
"""
from __future__ import annotations

import math
from dataclasses import fields, replace

from ..config import VARIANCE_TYPES, ScheduleConfig, from_dict

# our sampler -> the diffusers scheduler class it reproduces step for step; the `_karras` rows of
# ldm.samplers.SAMPLERS name their base here (SamplerSpec.scheduler), Karras being a grid option
SCHEDULER_CLASSES = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
SAMPLER_OF_CLASS = {c: s for s, c in SCHEDULER_CLASSES.items()}

# Each class's __init__ default for the settings the classes disagree on; a class missing from a
# row doesn't read that setting (diffusers 0.30 - 0.42 agree on all of these).
CLASS_DEFAULTS = {
    "timestep_spacing": {"ddpm": "leading", "ddim": "leading", "pndm": "leading", "euler": "linspace",
                         "euler_ancestral": "linspace", "dpmpp_2m": "linspace"},
    "set_alpha_to_one": {"ddim": True, "pndm": False},
}
# What a setting that a sampler doesn't read resolves to (it then has no effect).
NOT_READ = {"timestep_spacing": "leading", "set_alpha_to_one": False}
KARRAS_READERS = ("euler", "dpmpp_2m")   # classes with `use_karras_sigmas` (not EulerAncestral)

# What an absent key means, the same for every class (their __init__ defaults; not SD's values).
ABSENT = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon", steps_offset=0, rescale_betas_zero_snr=False,
              clip_sample=True, clip_sample_range=1.0, use_karras_sigmas=False,
              skip_prk_steps=False, variance_type="fixed_small", timestep_spacing=None,
              set_alpha_to_one=None)

# Keys ldm implements only at one value: any other is refused, naming the key.
ONLY = dict(trained_betas=None, thresholding=False, algorithm_type="dpmsolver++", solver_order=2,
            solver_type="midpoint", lower_order_final=True, euler_at_final=False,
            use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
            use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
            lambda_min_clipped=-math.inf, interpolation_type="linear", timestep_type="discrete",
            sigma_min=None, sigma_max=None, use_dynamic_shifting=False, time_shift_type="exponential")
# Read by diffusers only when `thresholding` is on, which ONLY keeps off: any value is harmless.
INERT = ("dynamic_thresholding_ratio", "sample_max_value")


def resolve(cfg: ScheduleConfig, sampler: str) -> ScheduleConfig:
    """cfg with each unset (None) setting replaced by the default of `sampler`'s diffusers class,
    as `Cls.from_config(pipe.scheduler.config)` does."""
    filled = {key: defaults.get(sampler, NOT_READ[key])
              for key, defaults in CLASS_DEFAULTS.items() if getattr(cfg, key) is None}
    return replace(cfg, **filled)


def karras_of(cfg: ScheduleConfig, sampler: str, karras: bool | None) -> bool:
    """Karras σ's for `sampler` (a SCHEDULER_CLASSES key): as asked, else the config's
    `use_karras_sigmas` where the class reads it."""
    if karras is not None:
        return karras
    return cfg.use_karras_sigmas and sampler in KARRAS_READERS


def _value_text(v) -> str:
    return "-inf" if v == -math.inf else repr(v)


def schedule_from_diffusers(d: dict, where: str = "scheduler config") -> tuple[ScheduleConfig, str]:
    """(ScheduleConfig, default sampler) of a diffusers scheduler config dict. Keys it leaves unset
    mean what they mean to diffusers; keys ldm can't honour are a ValueError naming them."""
    cls, unset = d.get("_class_name"), set(d.get("_use_default_values") or ())
    d = {k: v for k, v in d.items() if k not in unset and not k.startswith("_")}
    ours = {f.name for f in fields(ScheduleConfig)}
    unknown = sorted(set(d) - ours - set(ONLY) - set(INERT))
    if unknown:
        raise ValueError(f"{where}: unknown scheduler key(s) {', '.join(unknown)}; ldm implements "
                         f"{', '.join(sorted(ours | set(ONLY)))} and refuses what it can't honour")
    for key, only in ONLY.items():
        if key in d and not (d[key] == only or d[key] is None and only is None):
            raise ValueError(f"{where}: {key}={_value_text(d[key])} is not implemented by ldm's samplers "
                             f"(only {_value_text(only)}); remove the key to load this model")
    values = {k: d.get(k, ABSENT[k]) for k in ours}
    if values["variance_type"] is None:      # DPM-Solver's default: no learned variance
        values["variance_type"] = "fixed_small"
    if values["variance_type"] not in VARIANCE_TYPES:
        raise ValueError(f"{where}: variance_type={values['variance_type']!r} is not implemented "
                         f"(only {', '.join(VARIANCE_TYPES)})")
    try:
        cfg = from_dict(ScheduleConfig, values)           # types and ranges checked there
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e
    return cfg, SAMPLER_OF_CLASS.get(cls, cls) if cls else "ddim"   # no class named: our default


def schedule_to_diffusers(cfg: ScheduleConfig, sampler: str = "ddim") -> dict:
    """A diffusers scheduler config for `sampler`'s class; settings left unset stay absent, so
    diffusers resolves them as we do."""
    out = {"_class_name": SCHEDULER_CLASSES.get(sampler, "DDIMScheduler")}
    out.update({f.name: getattr(cfg, f.name) for f in fields(ScheduleConfig)
                if getattr(cfg, f.name) is not None})
    return out
