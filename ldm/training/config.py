"""Training configs for train_ldm.py and train_vae.py: frozen dataclasses loaded strictly from YAML
(configs/train_*.yaml), then `key.sub=value` overrides from the command line (`config_from_cli`).
The model config is a preset name or LDMConfig YAML (`model_preset`) or the `--init` checkpoint's
own config, refined by the `model:` section; a config that does not fit the `--init` checkpoint is
an error. Every value is checked when the config is built (__post_init__), so a bad one stops a
run before any work."""
from __future__ import annotations

import argparse
import contextlib
import functools
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from ..config import (RETIRED, AutoencoderConfig, LDMConfig, TextEncoderConfig, UNetConfig, apply_overrides,
                      from_dict, read_yaml, require)
from ..presets import PRESETS, tiny

LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("", "no", "fp16", "bf16")


def _at_least(low):
    return lambda v: low <= v < float("inf")  # NaN and inf fail


def _probability(v) -> bool:
    return 0 <= v <= 1


@dataclass(frozen=True)
class DataConfig:
    path: str = ""                   # image folder: metadata.jsonl captions or name.txt sidecars
    caption_column: str = "text"     # the metadata.jsonl key holding the caption
    allow_uncaptioned: bool = False  # train captionless images with "" instead of stopping
    resolution: int = 0              # training size in pixels; 0: the model's sample_size
    resize: int = 0                  # shorter side before cropping; 0: `resolution`. Larger: crops at that
                                     # scale (an f=32 autoencoder on 128-px crops of 512-px images)
    center_crop: bool = True         # False: a random crop
    random_flip: bool = False
    holdout: float = 0.0             # images kept out of training: a fraction (< 1) or a count (≥ 1)
    limit: int = 0                   # use only the first N images (0: all); a small N overfits on purpose
    num_workers: int = 0
    cache_latents: bool = False      # train_ldm: encode once, keep the posterior moments under out_dir

    def __post_init__(self):
        for name, allowed in (("resolution", ">= 0 (0: the model's sample_size)"), ("resize", ">= 0 (0: resolution)"),
                              ("limit", ">= 0 (0: all images)"), ("num_workers", ">= 0")):
            require(self, name, _at_least(0), allowed, "data.")
        require(self, "holdout", lambda v: 0 <= v < 1 or float(v).is_integer(),
                "a fraction in [0, 1) or a whole count of images", "data.")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0            # linear LR warm-up over this many optimizer steps
    grad_clip: float = 1.0           # max gradient norm; 0 disables clipping
    grad_accum: int = 1              # micro-batches per optimizer step
    lr_schedule: str = "constant"    # after warm-up: "constant", or "cosine" decay to 0 at max_steps

    def __post_init__(self):
        require(self, "lr_schedule", lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}", "optim.")
        require(self, "lr", lambda v: 0 < v < float("inf"), "a finite number > 0", "optim.")
        require(self, "eps", lambda v: 0 < v < float("inf"), "a finite number > 0", "optim.")
        require(self, "betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)", "optim.")
        require(self, "weight_decay", _at_least(0), "a finite number >= 0", "optim.")
        require(self, "grad_clip", _at_least(0), "a finite number >= 0 (0: no clipping)", "optim.")
        require(self, "warmup_steps", _at_least(0), ">= 0", "optim.")
        require(self, "grad_accum", _at_least(1), ">= 1", "optim.")


@dataclass(frozen=True)
class RunConfig:
    """Fields both scripts share."""
    model_preset: str = "tiny"       # a preset (sd15, sd21, sd21-base, tiny) or LDMConfig YAML; "": --init's own
    init: str = ""                   # start from these weights (anything Pipeline.from_pretrained loads)
    out_dir: str = "out/train"
    seed: int = 0
    max_steps: int = 1000            # optimizer steps
    batch_size: int = 4              # images per process per micro-batch
    mixed_precision: str = ""        # "no" | "fp16" | "bf16"; "": as `accelerate launch` was configured
    log_every: int = 10
    checkpoint_every: int = 500      # 0: no resumable checkpoints
    keep_checkpoints: int = 2
    export: str = ""                 # final .safetensors; "": a default name in out_dir
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        for name, low, note in (("max_steps", 1, " (optimizer steps to train)"), ("batch_size", 1, ""),
                                ("log_every", 1, ""), ("keep_checkpoints", 1, ""), ("seed", 0, ""),
                                ("checkpoint_every", 0, " (0: no checkpoints)")):
            require(self, name, _at_least(low), f">= {low}{note}", "")
        require(self, "mixed_precision", lambda v: v in MIXED_PRECISION, "'', 'no', 'fp16' or 'bf16'", "")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """train_ldm.py: the UNet (and optionally τθ) on latents of a frozen autoencoder."""
    model: LDMConfig = field(default_factory=tiny)
    vae: str = ""                    # autoencoder from train_vae.py (or any model file) replacing the model's
    cond_drop: float = 0.1           # P(caption -> "") for classifier-free guidance (Ho & Salimans 2022)
    noise_offset: float = 0.0        # offset noise (ldm.schedule.training_noise; 0.1 is common); 0: none
    snr_gamma: float = 0.0           # Min-SNR-γ loss weighting (Hang et al. 2023; 5 is theirs); 0: plain MSE
    use_ema: bool = True
    ema_decay: float = 0.9999        # warmed up as min(decay, (1 + n) / (10 + n)) (CompVis LitEma)
    sample_every: int = 0            # steps between sample grids; 0: none
    sample_prompts: tuple[str, ...] = ("a red circle on the left", "a blue square", "two green triangles", "")
    sample_steps: int = 20
    sample_guidance_scale: float = 5.0
    # LoRA (ldm/training/lora.py): > 0 trains only low-rank matrices of this rank beside the targets, the
    # whole model frozen (model.text_encoder.trainable too); the export is a kohya/A1111 LoRA file
    lora_rank: int = 0
    lora_alpha: float = 0.0          # scale = alpha / rank (kohya, PEFT); 0: alpha = rank
    lora_unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # module names / path suffixes
    lora_text_targets: tuple[str, ...] = ()  # e.g. [q_proj, k_proj, v_proj, out_proj]; (): no text-encoder LoRA

    def __post_init__(self):
        super().__post_init__()
        require(self, "lora_rank", _at_least(0), ">= 0 (0: train the model itself, no LoRA)", "")
        require(self, "lora_alpha", _at_least(0), "a finite number >= 0 (0: the rank)", "")
        if self.lora_rank and not (self.lora_unet_targets or self.lora_text_targets):
            raise ValueError("lora_rank > 0 needs modules to train: set lora_unet_targets and/or lora_text_targets")
        for name in ("noise_offset", "snr_gamma"):
            require(self, name, _at_least(0), ">= 0 (0 turns it off)", "")
        require(self, "cond_drop", _probability, "a probability in [0, 1]", "")
        require(self, "ema_decay", _probability, "in [0, 1]", "")
        require(self, "sample_every", _at_least(0), ">= 0 (0: no samples)", "")
        require(self, "sample_steps", _at_least(1), ">= 1", "")
        require(self, "sample_guidance_scale", _at_least(0), "a finite number >= 0", "")


# an experiment removed like those of the model config (ldm.config.RETIRED): old YAMLs may keep it off
_GROUNDING = "the cross-attention grounding loss (TokenCompose)", "ldm 0.1.0 at commit b2dd828"
RETIRED[TrainConfig] = {"grounding": (0.0, *_GROUNDING), "grounding_pixel": (0.0, *_GROUNDING)}


@dataclass(frozen=True)
class VAETrainConfig(RunConfig):
    """train_vae.py: the KL autoencoder (LDM's first stage), optionally against a PatchGAN."""
    model: AutoencoderConfig = field(default_factory=lambda: tiny().autoencoder)
    kl_weight: float = 1e-6          # LDM kl-f8 value; the reconstruction term is summed over pixels
    rec_loss: str = "l1"             # "l1" (LDM) or "mse": squared error trains flat-colour images faster
    perceptual_weight: float = 0.0   # LPIPS term; needs lpips and its VGG weights on disk (lpips_path)
    lpips_path: str = ""
    disc_weight: float = 0.5         # PatchGAN (Isola et al. 2017) hinge loss weight; 0: no discriminator
    disc_start: int = 50001          # step at which the discriminator switches on (LDM kl-f8 value)
    disc_layers: int = 3
    disc_lr: float = 0.0             # 0: optim.lr
    eval_every: int = 0              # held-out PSNR every N steps (also at the start and the end)
    init_logvar: float = -6.0        # a fresh posterior's initial log-variance (train_vae.py explains)
    fit_scale_factor: bool = True    # export scale_factor = 1 / std(z) (LDM §4.3.2) measured on training images

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("kl_weight", ">= 0"), ("perceptual_weight", ">= 0 (0: off)"),
                              ("disc_weight", ">= 0 (0: no discriminator)"), ("disc_lr", ">= 0 (0: optim.lr)"),
                              ("disc_start", ">= 0"), ("eval_every", ">= 0 (0: at the start and the end)")):
            require(self, name, _at_least(0), allowed, "")
        require(self, "disc_layers", _at_least(1), ">= 1", "")
        require(self, "init_logvar", lambda v: abs(v) < float("inf"), "a finite number", "")


# ---------------------------------------------------------------------------------------------
# Building a config: YAML, then the model, then command-line overrides

# Fields that change training, not the weights: they may differ from the --init checkpoint's.
TRAINING_ONLY = {"use_checkpoint", "trainable"}
ARCH_CLASSES = (UNetConfig, AutoencoderConfig, TextEncoderConfig)  # LDMConfig's schedule and sizes are free


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return out


@contextlib.contextmanager
def _user_error(prefix: str = "", catch=(TypeError,)):
    """A value of the wrong type (from_dict/apply_overrides raise TypeError naming the key, the
    type and the value) is bad input like any other: a ValueError, which the scripts report in one
    line. `prefix` says where the value came from (a file)."""
    try:
        yield
    except catch as e:
        raise ValueError(f"{prefix}{e}") from None


def _preset(cls, name: str):
    if name in PRESETS:
        ldm = PRESETS[name]()
    elif Path(name).suffix in (".yaml", ".yml") and Path(name).is_file():
        with _user_error(f"{name}: ", (TypeError, ValueError)):
            ldm = from_dict(LDMConfig, read_yaml(name))
    else:
        raise ValueError(f"model_preset {name!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                         f"existing LDMConfig .yaml file")
    return ldm.autoencoder if cls is VAETrainConfig else ldm


def _architecture_diff(ours, theirs, prefix: str = "model.", ignore=TRAINING_ONLY) -> list[str]:
    """Fields that define the weights (shapes, latent scale) and differ between two model configs."""
    diff = []
    for f in fields(ours):
        a, b, name = getattr(ours, f.name), getattr(theirs, f.name), prefix + f.name
        if is_dataclass(a):
            if f.name in ("unet", "autoencoder", "text_encoder"):
                diff += _architecture_diff(a, b, name + ".", ignore)
        elif f.name not in ignore and a != b and isinstance(ours, ARCH_CLASSES):
            if not (f.name == "projection_dim" and getattr(ours, "kind", "") == "clip"):  # unused by CLIPTextModel
                diff.append(f"{name}: config {a!r}, checkpoint {b!r}")
    return diff


def load_train_config(cls, path: str | None = None, overrides=(), init: str | None = None,
                      read_model=None):
    """TrainConfig / VAETrainConfig from a YAML file and `a.b=value` overrides. With an init
    checkpoint, `read_model(init)` gives its model config: the base when model_preset is "", else it
    must fit the preset's architecture."""
    raw = {}
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no training config at {path}")
        raw = read_yaml(path)
    model_raw = raw.pop("model", None) or {}
    if not isinstance(model_raw, dict):
        raise ValueError(f"{path}: `model:` must be a mapping of model config keys")
    overrides = [o.lstrip("-") for o in overrides]
    model_over = [o[len("model."):] for o in overrides if o.startswith("model.")]
    with _user_error(f"{path}: " if path else "", (TypeError, ValueError)):
        cfg = from_dict(cls, raw)
    with _user_error():
        cfg = apply_overrides(cfg, [o for o in overrides if not o.startswith("model.")])
    if init is not None:
        cfg = replace(cfg, init=init)
    init_model = read_model(cfg.init) if cfg.init and read_model is not None else None
    if cfg.model_preset:
        model = _preset(cls, cfg.model_preset)
    elif init_model is not None:
        model = init_model
    else:
        raise ValueError("model_preset is empty and there is no --init checkpoint: name a preset "
                         f"(--set model_preset=tiny; one of {', '.join(PRESETS)}) or pass --init PATH")
    with _user_error("model."):
        model = apply_overrides(model, [f"{k}={v!r}" for k, v in _flatten(model_raw)] + model_over)
    if init_model is not None and cfg.model_preset:
        # train_vae.py refits scale_factor, so only there may it differ
        ignore = TRAINING_ONLY | ({"scale_factor"} if cls is VAETrainConfig else set())
        if getattr(cfg, "vae", ""):  # --vae replaces the checkpoint's autoencoder, config and all
            init_model = replace(init_model, autoencoder=model.autoencoder)
        diff = _architecture_diff(model, init_model, ignore=ignore)
        if diff:
            raise ValueError(f"the model config (model_preset={cfg.model_preset!r} plus overrides) does not "
                             f"fit the --init checkpoint {cfg.init}: " + "; ".join(diff) +
                             ". Set model_preset to the checkpoint's family, or model_preset='' to take "
                             "the checkpoint's own config.")
    return replace(cfg, model=model)


def parse_cli(argv=None, description: str = "", extra: tuple[str, ...] = ()):
    """(args, overrides): --config, --init, --resume and any `--set key=value` or `--key.sub=value`."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training YAML, e.g. configs/train_tiny.yaml")
    p.add_argument("--init", help="start from these weights (our .safetensors, an SD file, a diffusers folder)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let --init/--vae read pickle files (.ckpt), which can run code when loaded")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")
    for name in extra:  # --lora-rank sets lora_rank
        p.add_argument(f"--{name}", dest=name.replace("-", "_"), help=f"sets the config field {name.replace('-', '_')}")
    args, rest = p.parse_known_args(argv)
    for item in rest:
        if not (item.startswith("--") and "=" in item):
            p.error(f"unrecognised argument {item!r}: overrides look like --optim.lr=1e-4")
        args.overrides.append(item[2:])
    for name in (n.replace("-", "_") for n in extra):
        if getattr(args, name) is not None:
            args.overrides.append(f"{name}={getattr(args, name)!r}")
    return args, args.overrides


def config_from_cli(cls, argv, description: str, read_weights, extra: tuple[str, ...] = ()):
    """(args, cfg, read) for a training script: `cls` built from --config, --init and the overrides.
    `read(path) -> (model config, weights)` is `read_weights` remembering its last file, so --init is
    read once: for checking the config against it, then for its weights."""
    args, overrides = parse_cli(argv, description, extra)
    read = functools.lru_cache(maxsize=1)(functools.partial(read_weights, allow_pickle=args.allow_pickle))
    cfg = load_train_config(cls, args.config, overrides, args.init, lambda path: read(path)[0])
    return args, cfg, read
