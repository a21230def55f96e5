"""Configs: frozen dataclasses, one per network plus the diffusion process.

Field names follow the original SD YAML (`v1-inference.yaml`, `ddconfig`) where one exists, so
original configs map 1:1. Loading is strict: an unknown key is an error, never ignored.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from .image_config import ImageAdapterConfig, ImageEncoderConfig, PriorConfig, check_embedding_parts


def require(cfg, name: str, ok, allowed: str, where: str | None = None) -> None:
    """Config validation (__post_init__): unless ok(value), a ValueError naming the field, its value
    and what is allowed. `where` prefixes the name (default: the class name and a dot)."""
    value = getattr(cfg, name)
    if not ok(value):
        where = type(cfg).__name__ + "." if where is None else where
        raise ValueError(f"{where}{name} must be {allowed}, got {value!r}")


def _positive(v) -> bool:
    return v >= 1


def _groups_divide(widths):
    # layers.normalize takes min(groups, width) groups: widths below `groups` always work
    return lambda g: g >= 1 and all(w % min(g, w) == 0 for w in widths)


@dataclass(frozen=True)
class AutoencoderConfig:
    """KL autoencoder (CompVis `ddconfig`). Downsampling factor f = 2 ** (len(ch_mult) - 1)."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4            # latent channels
    embed_dim: int = 4             # channels after quant_conv (= z_channels in SD)
    attn_resolutions: tuple[int, ...] = ()  # only the mid-block has attention in SD
    norm_groups: int = 32          # not in SD YAML; lets tests use tiny widths
    scale_factor: float = 0.18215  # z_unit = scale_factor * z; SD1/2 value
    pixel_scale: int = 1           # fixed ×k antialiased resampling around the learned network: images
                                   # k× larger than it sees (the default model: f=8 learned, 512 px out)
    upsampler_channels: int = 0    # > 0 (needs pixel_scale > 1): decode's ×pixel_scale is bicubic plus a
                                   # learned sub-pixel residual of this width (autoencoder.Upsampler); 0: bicubic
    upsampler_blocks: int = 2      # its 3×3 convolutions at the network's size between the first and the last

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1) * self.pixel_scale

    def __post_init__(self):
        for name in ("in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "embed_dim", "pixel_scale"):
            require(self, name, _positive, ">= 1")
        require(self, "ch_mult", lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of integers >= 1")
        require(self, "attn_resolutions", lambda v: all(r >= 1 for r in v), "a list of downsampling factors >= 1")
        require(self, "scale_factor", lambda v: 0 < v < float("inf"), "a finite number > 0")
        widths = sorted({self.ch, *(self.ch * m for m in self.ch_mult)})  # every GroupNorm's width
        require(self, "norm_groups", _groups_divide(widths), f"a divisor of every width >= it among {widths}")
        require(self, "upsampler_channels", lambda v: v >= 0, ">= 0 (0: bicubic ×pixel_scale, no upsampler)")
        require(self, "upsampler_channels", lambda v: v == 0 or self.pixel_scale > 1,
                f"0 when pixel_scale is 1 (the upsampler replaces the bicubic ×pixel_scale; pixel_scale "
                f"is {self.pixel_scale})")
        require(self, "upsampler_blocks", lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class UNetConfig:
    """Cross-attention UNet (CompVis `openaimodel.UNetModel`)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with a SpatialTransformer
    num_heads: int = 8                 # SD1; SD2 sets -1 and num_head_channels=64
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 768             # 1024 for SD2 (OpenCLIP ViT-H)
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear, not 1x1 Conv
    num_classes: int | None = None     # class-conditional: label_emb added to the time embedding (x4: noise_level)
    adm_in_channels: int | None = None # a vector instead: label_emb an MLP of it (Stable unCLIP's noised embedding)
    disable_self_attentions: tuple[bool, ...] | None = None  # per level: True = attn1 attends to the context,
                                       # not to itself (x4 upscaler; diffusers' only_cross_attention)
    disable_middle_self_attn: bool = False  # the same for the middle block
    use_scale_shift_norm: bool = False # AdaGN h = norm(h)·(1+scale)+shift (Dhariwal & Nichol); SD adds
    norm_groups: int = 32
    use_checkpoint: bool = False       # gradient checkpointing in training

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "transformer_depth",
                     "context_dim"):
            require(self, name, _positive, ">= 1")
        require(self, "channel_mult", lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of integers >= 1")
        require(self, "attention_resolutions", lambda v: all(r >= 1 for r in v),
                "a list of downsampling factors >= 1")
        require(self, "num_classes", lambda v: v is None or v >= 1, "null or >= 1")
        require(self, "adm_in_channels", lambda v: v is None or v >= 1 and self.num_classes is None,
                "null or >= 1, and null with num_classes")
        require(self, "disable_self_attentions", lambda v: v is None or len(v) == len(self.channel_mult),
                f"null or one true/false per level ({len(self.channel_mult)}, as channel_mult)")
        # the widths UNetModel builds: its levels, and the decoder's inputs (level + skip, concatenated)
        mc, nrb = self.model_channels, self.num_res_blocks
        levels = [mc * m for m in self.channel_mult]
        skips = [mc] + [w for i, w in enumerate(levels) for _ in range(nrb + (i < len(levels) - 1))]
        widths, ch = {mc, *levels}, levels[-1]
        for w in reversed(levels):
            for _ in range(nrb + 1):
                widths.add(ch + skips.pop())
                ch = w
        require(self, "norm_groups", _groups_divide(widths), f"a divisor of every width >= it among {sorted(widths)}")
        attn = sorted({levels[-1]} | {w for i, w in enumerate(levels) if 2 ** i in self.attention_resolutions})
        if self.num_head_channels != -1:  # SD2: fixed head width, num_heads unused (-1)
            require(self, "num_head_channels", lambda v: v >= 1 and all(w % v == 0 for w in attn),
                    f"-1 (heads from num_heads) or a divisor of the attention widths {attn}")
        else:
            require(self, "num_heads", lambda v: v >= 1 and all(w % v == 0 for w in attn),
                    f"a divisor of the attention widths {attn} (or set num_head_channels)")

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of a transformer with `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class TextEncoderConfig:
    """Text encoder τθ. kind: "clip" (transformers CLIPTextModel, SD1 and diffusers-SD2),
    "openclip" (open_clip text tower, original SD2 files), "t5" (transformers T5EncoderModel)."""
    kind: str = "clip"
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 77
    hidden_act: str = "quick_gelu"   # CLIP ViT-L/14: quick_gelu; OpenCLIP ViT-H: gelu
    layer: str = "last"              # "last" | "penultimate" (SD2 takes the penultimate layer)
    pad_with: str = "eos"            # "eos" (id 49407, SD1 / transformers) | "zero" (SD2 / open_clip)
    projection_dim: int = 768        # CLIP text_projection width (unused by SD, kept for round trips)
    d_kv: int = 64                   # t5 only: per-head width
    trainable: bool = False          # trained jointly with the UNet (LDM's τθ)

    def __post_init__(self):
        require(self, "kind", lambda v: v in ("clip", "openclip", "t5"), "one of clip, openclip, t5")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length",
                     "projection_dim", "d_kv"):
            require(self, name, _positive, ">= 1")
        if self.kind != "t5":  # t5 heads have their own width, d_kv
            require(self, "num_heads", lambda v: self.hidden_size % v == 0,
                    f"a divisor of hidden_size={self.hidden_size}")
        if self.layer == "penultimate":
            require(self, "num_layers", lambda v: v >= 2, ">= 2 with layer: penultimate")


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")   # DDPM's; learned variances are not implemented


@dataclass(frozen=True)
class ScheduleConfig:
    """Discrete-time diffusion process and sampler settings, named and valued as in the real SD 1.x/2.x
    diffusers scheduler configs. None = not set by the checkpoint: each sampler then takes the default
    of its diffusers class, as `Cls.from_config(pipe.scheduler.config)` does (ldm/formats/diffusers_scheduler.py)."""
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # CompVis "linear" is this; also "linear", "squaredcos_cap_v2"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"      # "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str | None = None   # "leading" (+ steps_offset) | "trailing" | "linspace"; SD sets
                                          # none: "leading" for DDPM/DDIM/PNDM, "linspace" for Euler/DPM++
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False  # ᾱ_T = 0 (Lin et al. 2023); pair with v_prediction, "trailing"
    clip_sample: bool = False             # DDPM/DDIM clip pred_x0 to ±clip_sample_range
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool | None = False # DDIM/PNDM: the last step ends at ᾱ = 1, not ᾱ_0; unset: DDIM
                                          # True, PNDM False
    use_karras_sigmas: bool = False       # Karras σ's for euler and dpmpp_2m when no sampler is named
    skip_prk_steps: bool = True           # PNDM: PLMS from the first step (SD); False = PRK warm-up
    variance_type: str = "fixed_small"    # DDPM: "fixed_small" (β̃_t) | "fixed_large" (β_t)

    def __post_init__(self):
        require(self, "num_train_timesteps", _positive, ">= 1")
        for name in ("beta_start", "beta_end"):
            require(self, name, lambda v: 0 < v < 1, "a number in (0, 1)")
        for name, options in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", (None, *TIMESTEP_SPACINGS)), ("variance_type", VARIANCE_TYPES)):
            require(self, name, lambda v: v in options, "one of " + ", ".join(map(str, options)))
        require(self, "steps_offset", lambda v: v >= 0, ">= 0")
        require(self, "clip_sample_range", lambda v: 0 < v < float("inf"), "a finite number > 0")


@dataclass(frozen=True)
class LDMConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)  # None: image variations
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sample_size: int = 512        # default output height/width in pixels
    default_steps: int = 50
    default_guidance_scale: float = 7.5
    default_sampler: str = "ddim"
    layout_planner: str | None = None  # ldm.planners name: prompt -> regions (ldm/regions.py)
    regions_from_t: int = 600          # regions guide the steps at t ≥ this (the layout-forming ones)
    low_res_schedule: ScheduleConfig | None = None  # upscaler: the schedule noising the low-res image to
                                       # noise_level, the UNet's class label (diffusers' low_res_scheduler)
    max_noise_level: int | None = None # upscaler: the highest noise_level accepted (x4: 350)
    # the DALL·E 2 family (ldm/image_config.py, ldm/unclip.py, ldm/prior.py): a CLIP image embedding read by
    # the decoder as its one context token ("context": image variations) or noised into the time embedding
    # ("unclip": Stable unCLIP); a prior draws one from the text
    image_embedding: str | None = None
    image_encoder: ImageEncoderConfig | None = None
    image_adapter: ImageAdapterConfig | None = None         # context: the embedding -> several context tokens
    embedding_noise_schedule: ScheduleConfig | None = None  # unclip: noises the embedding to noise_level
    prior: PriorConfig | None = None
    prior_text_encoder: TextEncoderConfig | None = None     # CLIPTextModelWithProjection of the prior
    prior_schedule: ScheduleConfig | None = None            # the prior's DDPM

    @property
    def latent_size(self) -> int:
        return self.sample_size // self.autoencoder.downsample_factor

    @property
    def image_conditioning(self) -> str | None:
        """What the UNet's input holds beside the latents, in diffusers' order: None (text-to-image),
        "inpaint" ([latents, mask, masked-image latents]) or "upscale" ([latents, low-res image], the
        noise_level as class label y). A ValueError for any other UNet: ldm has no pipeline for it."""
        u, image = self.unet, self.autoencoder.in_channels
        if self.low_res_schedule is not None:
            return "upscale"
        if u.in_channels in (u.out_channels, 2 * u.out_channels + 1):
            return None if u.in_channels == u.out_channels else "inpaint"
        raise ValueError(f"this UNet takes {u.in_channels} input channels for {u.out_channels} latent channels: "
                         f"neither text-to-image ({u.out_channels}), inpainting ({2 * u.out_channels + 1}) nor an "
                         f"upscaler ({u.out_channels + image}, with low_res_schedule and max_noise_level)")

    def __post_init__(self):
        f = self.autoencoder.downsample_factor
        require(self, "sample_size", lambda v: v >= 1 and v % f == 0,
                f"a positive multiple of the autoencoder's downsampling factor {f}")
        require(self, "default_steps", _positive, ">= 1")
        require(self, "default_guidance_scale", lambda v: 0 <= v < float("inf"),
                "a finite number >= 0 (1: no guidance)")  # NaN fails
        require(self, "regions_from_t", lambda v: v >= 0, ">= 0")
        check_embedding_parts(self)
        if self.low_res_schedule is None:
            require(self, "max_noise_level", lambda v: v is None, "null without a low_res_schedule")
            return
        u, image = self.unet, self.autoencoder.in_channels
        if u.in_channels != u.out_channels + image or u.num_classes is None:
            raise ValueError(f"LDMConfig.low_res_schedule is set (an upscaler), but the UNet is not an upscaler's: "
                             f"that takes in_channels = out_channels + {image} (the latents and the low-res image), "
                             f"got {u.in_channels}, and num_classes (noise_level is its class label), got "
                             f"{u.num_classes}")
        most = min(u.num_classes, self.low_res_schedule.num_train_timesteps) - 1
        require(self, "max_noise_level", lambda v: v is not None and 0 <= v <= most,
                f"an integer in [0, {most}] with a low_res_schedule (a valid class label and timestep)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "LDMConfig":
        return from_dict(cls, d)

    @classmethod
    def from_json(cls, s: str) -> "LDMConfig":
        return cls.from_dict(json.loads(s))


# ---------------------------------------------------------------------------------------------
# Strict (de)serialisation

# Fields of experiments removed from ldm, by config class: (the value that turned it off, what it was
# and the last ldm that had it). Old files and overrides may still set the off value, which is
# dropped; any other value is refused.
_MATCHER = "a noised image-text matcher (docs/default_model.md)", "ldm 0.1.0 at commit 3417574"
RETIRED: dict[type, dict[str, tuple]] = {
    LDMConfig: {"matcher": (None, *_MATCHER), "default_matcher_scale": (0.0, *_MATCHER)},
    TextEncoderConfig: {"bidirectional": (False, "a bidirectional CLIP text encoder (no causal mask)",
                                          "ldm 0.1.0 at commit b2dd828")},
}


def _retired(cls, name: str, value, full_name: str) -> bool:
    """Whether `name` is a retired field of `cls` set to its off value (to be dropped); a ValueError
    naming the experiment if it is set to anything else."""
    if name not in RETIRED.get(cls, {}):
        return False
    off, what, last = RETIRED[cls][name]
    if value != off:
        raise ValueError(f"{full_name}={value!r} turns on {what}, an experiment since removed from ldm "
                         f"({last} has it); only {full_name}={off!r} (off) is still accepted")
    return True


def _coerce(tp, value, where: str):
    """Convert a JSON/YAML value to the annotated field type, or raise TypeError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where + "." if where else "")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass `cls` from a dict; unknown keys raise ValueError naming them."""
    d = {k: v for k, v in d.items() if not _retired(cls, k, v, where + k)}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)} "
                         f"for {cls.__name__}; valid keys: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(hints[k], v, f"{where}{k}") for k, v in d.items()})


def apply_overrides(cfg, overrides: list[str]):
    """Apply `a.b.c=value` strings; values are read as YAML (true, 1e-4, [1, 2], null, text).
    An empty value (`model_preset=`) is the empty string, as a shell user means it; `null` is None."""
    import yaml
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as text
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        cfg = _set_path(cfg, key.split("."), value, key)
    return cfg


def _set_path(obj, path: list[str], value, full: str):
    hints = typing.get_type_hints(type(obj))
    if path[0] not in hints:
        if len(path) == 1 and _retired(type(obj), path[0], value, full):
            return obj
        raise ValueError(f"unknown config key {full!r}; valid here: {', '.join(sorted(hints))}")
    if len(path) == 1:
        return replace(obj, **{path[0]: _coerce(hints[path[0]], value, full)})
    return replace(obj, **{path[0]: _set_path(getattr(obj, path[0]), path[1:], value, full)})


def read_yaml(path) -> dict:
    """A YAML file's mapping; a syntax error names the file and the line, as a ValueError."""
    import yaml
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}{at}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    return raw


def load_yaml(cls, path: str | Path):
    return from_dict(cls, read_yaml(path))


def save_yaml(cfg, path: str | Path) -> None:
    import yaml

    def plain(o):
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [plain(v) for v in o]
        return o
    Path(path).write_text(yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False))
