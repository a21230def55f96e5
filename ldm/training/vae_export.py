"""The autoencoder file train_vae.py exports and `train_ldm.py --vae` reads: one .safetensors with
the weights as `first_stage_model.*` and the AutoencoderConfig in its metadata."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .. import checkpoint
from ..config import AutoencoderConfig, from_dict
from ..formats.files import read_safetensors, write_safetensors
from ..formats.keys import VAE, split


def save_autoencoder(sd: dict, cfg: AutoencoderConfig, path: str | Path) -> None:
    """The weights (without prefix) and their config into one .safetensors."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: the autoencoder is exported as .safetensors")
    write_safetensors({VAE + k: v for k, v in sd.items()}, path,
                      {"format": "pt", "autoencoder_config": json.dumps(asdict(cfg))})


def load_autoencoder(path: str | Path, allow_pickle: bool = False) -> tuple[AutoencoderConfig, dict]:
    """(config, weights without prefix) from a save_autoencoder file, or the autoencoder of any
    model checkpoint.load reads (ours, an original SD file, a diffusers folder)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        tensors, meta = read_safetensors(path)
        if "autoencoder_config" in meta:
            cfg = from_dict(AutoencoderConfig, json.loads(meta["autoencoder_config"]))
            return cfg, split(tensors, VAE)
    cfg, sd = checkpoint.load(path, allow_pickle=allow_pickle)
    return cfg.autoencoder, split(sd, VAE)
