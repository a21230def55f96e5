"""Which dtype runs fast where, and the memory layout that goes with it.

float32 is the exact path (bit for bit diffusers' pictures). bfloat16 is the fast path only where the
hardware computes it natively: CUDA GPUs from Ampere on, and CPUs with AVX512-BF16 or AMX. Elsewhere
a CPU emulates it and a 3×3 conv takes ~10-300× longer than in float32 (measured on an AVX2 EPYC:
0.48 s fp32, 4.1 s bf16 channels-last, 141 s bf16 NCHW), so asking for it there gets a warning.
Reduced precision runs channels-last: oneDNN's and cuDNN's fast convolutions want NHWC, and the
attention blocks' flatten/transpose become views instead of copies.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

REDUCED = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (oneDNN's check; /proc/cpuinfo where torch lacks it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def native(dtype: torch.dtype, device: torch.device) -> bool:
    """Does `device` compute `dtype` at full speed (not emulated)?"""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return dtype == torch.bfloat16 and cpu_has_native_bf16()
    return dtype == torch.float16               # mps


def auto_dtype(device: torch.device) -> torch.dtype:
    """`--dtype auto`: float16 on a GPU, bfloat16 on a CPU that has it natively, float32 otherwise."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    if not native(dtype, device):
        what = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "native float16 arithmetic"
        warnings.warn(f"{dtype} on this {device.type.upper()} is emulated (it has no {what}): expect it to be "
                      f"many times slower than torch.float32; use dtype=torch.float32 (--dtype float32) or "
                      f"'auto'", stacklevel=4)


def memory_format(dtype: torch.dtype) -> torch.memory_format:
    """channels-last for the reduced-precision paths; float32 keeps diffusers' NCHW layout, whose
    convolution kernels give its numbers bit for bit."""
    return torch.channels_last if dtype in REDUCED else torch.contiguous_format


NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
         "float16": torch.float16, "fp16": torch.float16}


def resolve(dtype, device: torch.device, warn: bool = True) -> torch.dtype:
    """A torch dtype from a dtype, one of NAMES or "auto"; warns when `device` would emulate it."""
    if dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, str):
        if dtype not in NAMES:
            raise ValueError(f"unknown dtype {dtype!r}: use 'auto' or one of {sorted(NAMES)}")
        dtype = NAMES[dtype]
    if dtype not in (torch.float32, *REDUCED):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16, torch.float16 or 'auto', got {dtype!r}")
    if warn:
        warn_if_emulated(dtype, device)
    return dtype
