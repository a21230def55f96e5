"""Argument checks shared by the library and the CLI: one check per argument, a message that says
what to do, and nothing computed before they pass. numpy integers count as integers; bools don't."""
from __future__ import annotations

import math
import numbers
import os

import torch


def as_int(value, name: str, low: int, high: int | None = None, hint: str = "") -> int:
    """value as a plain int in [low, high], or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            low <= value and (high is None or value <= high)):
        where = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        raise ValueError(f"{name} must be an integer {where}{hint}, got {value!r}")
    return int(value)


def as_float(value, name: str, low: float, high: float = math.inf, hint: str = "") -> float:
    """value as a finite float in [low, high], or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not (
            low <= value <= high):
        where = f"in [{low}, {high}]" if math.isfinite(high) else f"≥ {low}"
        raise ValueError(f"{name} must be a finite number {where}{hint}, got {value!r}")
    return float(value)


def as_size(value, name: str, factor: int) -> int:
    """A positive multiple of the autoencoder's factor; the message names the nearest valid sizes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < factor or value % factor:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            below = (value // factor) * factor
            options = [s for s in (below, below + factor) if s >= factor] or [factor]
            nearest = " and ".join(str(s) for s in options)
        else:
            nearest = str(factor)
        raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}; the nearest "
                         f"valid size{'s are' if ' and ' in nearest else ' is'} {nearest}")
    return int(value)


def check_device(device) -> torch.device:
    """A torch device that exists here, or ValueError saying which ones do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (no GPU, or torch "
                         f"{torch.__version__} was built without CUDA); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'mps'")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device` (MemAvailable for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
