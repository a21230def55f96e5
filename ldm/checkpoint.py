"""Checkpoint I/O for three formats, all loaded strictly:
- "ldm": one .safetensors in original SD key layout whose metadata holds the full config (JSON);
- "original": a single-file SD 1.x/2.x checkpoint; the config is inferred from tensor shapes;
- "diffusers": a folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
In memory the model is always `LatentDiffusion`, whose state dict is the original layout. The
formats themselves live in ldm/formats/; this module is the entry points."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from .config import LDMConfig, load_yaml
from .formats.diffusers_folder import diffusers_config, load_diffusers, save_diffusers
from .formats.files import detect_format, read_state_dict, write_safetensors
from .formats.keys import assert_shapes_match
from .formats.original import from_original, infer_config, to_original


def resolve_config(config: LDMConfig | str | Path | None) -> LDMConfig | None:
    """The `config=` of `load`: an LDMConfig; an ldm config file, .yaml (`ldm.config.save_yaml`) or
    .json (`LDMConfig.to_json`); or a diffusers folder whose config files describe the model, as
    diffusers' `from_single_file(path, config=folder)` reads it (its weights are not read)."""
    if config is None or isinstance(config, LDMConfig):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be an LDMConfig, a .yaml/.json config file or a diffusers folder, "
                        f"got {type(config).__name__}")
    path = Path(config)
    if path.is_dir():
        return diffusers_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config at {path}")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{path}: a config is a .yaml or .json ldm config file or a diffusers folder")
    try:
        if path.suffix == ".json":
            return LDMConfig.from_json(path.read_text())
        return load_yaml(LDMConfig, path)
    except (ValueError, TypeError) as e:                 # YAML syntax errors included (read_yaml)
        raise ValueError(f"{path} is not a valid ldm config: {e}") from e


def load(path: str | Path, config: LDMConfig | str | Path | None = None, *, prediction_type: str | None = None,
         use_ema: bool = False, allow_pickle: bool = False) -> tuple[LDMConfig, dict]:
    """(config, state dict in our module's keys) of any supported checkpoint. `config` (see
    `resolve_config`) overrides the file's own, and is needed for an original file that is not SD1/SD2."""
    config = resolve_config(config)
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "diffusers":
        cfg, sd = load_diffusers(path, allow_pickle)
    else:
        raw, meta = read_state_dict(path, allow_pickle)
        if fmt == "ldm":
            try:
                cfg = LDMConfig.from_json(meta["ldm_config"])
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}: the config in its metadata is invalid: {e}") from e
        elif config is not None:
            cfg = config
        else:
            try:
                cfg = infer_config(raw, prediction_type)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
        sd = from_original(raw, cfg, use_ema)
    if config is not None:
        cfg = config
    if prediction_type is not None:
        cfg = replace(cfg, schedule=replace(cfg.schedule, prediction_type=prediction_type))
    return cfg, sd


def save(sd: dict, cfg: LDMConfig, path: str | Path, fmt: str = "ldm",
         dtype: torch.dtype | None = None) -> None:
    """Write `sd` (our module's keys) as "ldm" (default), "original" or "diffusers"."""
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    ours_only = [what for what, used in (
        (f"the autoencoder's learned upsampler (autoencoder.upsampler_channels={cfg.autoencoder.upsampler_channels}, "
         f"weights first_stage_model.upsampler.*) nor its pixel_scale", cfg.autoencoder.upsampler_channels),
        ("the image-variation adapter (image_adapter, weights image_adapter.*)", cfg.image_adapter)) if used]
    if fmt in ("original", "diffusers") and ours_only:
        raise ValueError(f"the {fmt} layout can't express {', nor '.join(ours_only)}: save as 'ldm'")
    if fmt == "diffusers":
        return save_diffusers(sd, cfg, Path(path))
    if fmt not in ("ldm", "original"):
        raise ValueError(f"unknown format {fmt!r}: use 'ldm', 'original' or 'diffusers'")
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    if fmt == "original" and cfg.autoencoder.pixel_scale != 1:
        raise ValueError("the original layout can't express autoencoder.pixel_scale: save as 'ldm'")
    meta = {"format": "pt"}
    if fmt == "ldm":
        meta["ldm_config"] = cfg.to_json()
    write_safetensors(to_original(sd, cfg), path, meta)


def load_into(model: torch.nn.Module, sd: dict, source: str, dtype: torch.dtype | None = None) -> None:
    """Strict load: every key present with its shape, nothing extra; else one clear error.

    The tensors become the model's parameters (assign=True: no second copy of the model in memory),
    each copied first into fresh, contiguous memory, replacing its entry in `sd` so the source can be
    freed as we go. The copy is what makes a model compute the same numbers whatever file it came
    from: a tensor read from a .safetensors file lies at whatever address alignment the file's
    header length gives it (the ldm format's header holds the config), and CPU matmul kernels pick
    their vectorised path by alignment, so batch-1 linears (the time embedding) summed in another
    order gave outputs ~2e-6 apart for bit-identical weights. Views left by the key conversions
    (transposes, chunks, [:, :, None, None]) get ordinary strides the same way. `dtype`: floating
    tensors are converted in that same copy (an fp16 file loaded as fp32 is copied once, not twice)."""
    assert_shapes_match(sd, model.state_dict(), f"checkpoint {source}")
    for k in list(sd):
        t = sd[k]
        to = dtype if dtype is not None and t.is_floating_point() else t.dtype
        sd[k] = t.to(to, memory_format=torch.contiguous_format, copy=True)
    model.load_state_dict(sd, strict=True, assign=True)
