"""Changing a model's stored sampling settings (`ldm convert --set`): the top-level LDMConfig fields
that leave the weights' shapes alone, each checked against what it names (a sampler, a planner)."""
from __future__ import annotations

import typing
from dataclasses import is_dataclass

from .config import LDMConfig, apply_overrides
from .planners import planner
from .formats.diffusers_scheduler import SCHEDULER_CLASSES


def set_settings(cfg: "LDMConfig", overrides: list[str]) -> "LDMConfig":
    """`apply_overrides` limited to the settings that don't change the weights' shapes: the plain
    top-level fields of LDMConfig (default_steps, default_sampler, layout_planner, ...)."""
    settings = sorted(name for name, tp in typing.get_type_hints(LDMConfig).items()
                      if not any(is_dataclass(a) for a in (tp, *typing.get_args(tp))))  # no sub-config
    for item in overrides:
        key = item.lstrip("-").partition("=")[0]
        if key not in settings:
            raise ValueError(f"--set {item!r}: only these settings can change without retraining: "
                             f"{', '.join(settings)}")
    cfg = apply_overrides(cfg, overrides)
    if cfg.default_sampler not in SCHEDULER_CLASSES:   # a model must draw with no sampler named
        raise ValueError(f"default_sampler must be one of {', '.join(SCHEDULER_CLASSES)} (a model's Karras "
                         f"default is its schedule's use_karras_sigmas), got {cfg.default_sampler!r}")
    if cfg.layout_planner is not None:
        planner(cfg.layout_planner)  # a clear error for an unknown name, before anything is written
    return cfg
