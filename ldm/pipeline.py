"""Text-to-image as one straight line: prompt -> context -> guided sampling of latents -> decoder
-> images. Loading and saving (`from_pretrained`, `save_pretrained`) go through checkpoint.py."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from PIL import Image

from . import checkpoint
from .config import LDMConfig
from .diffusion import LatentDiffusion
from .guidance import check_guidance_rescale, classifier_free
from .planners import planner
from .regions import Region, as_regions, box_mask, regional_classifier_free
from .checks import as_float, as_int, as_size, available_memory, check_device
from .samplers import SAMPLERS, check_options, sample
from .formats.diffusers_scheduler import karras_of, resolve

OUTPUT_TYPES = ("pil", "np", "latent")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "ldm-default.safetensors"


def default_model_path() -> Path:
    """The small model this project trains and ships in weights/ (see README)."""
    if not DEFAULT_MODEL.is_file():
        raise FileNotFoundError(f"the default model {DEFAULT_MODEL} is missing; pass a model path "
                                f"or reinstall from a checkout that has weights/")
    return DEFAULT_MODEL


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """x (B, 3, H, W) in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in to_uint8(x)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    x = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)   # (B, H, W, 3)
    return (x * 255).round().to(torch.uint8).cpu().numpy()


def _as_list(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{what} is an empty list: give at least one prompt")
    return list(prompts)


class Pipeline:
    def __init__(self, model: LatentDiffusion, device="cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None):
        self.device, self.dtype, self.source = check_device(device), dtype, source
        self.model = model.to(device=self.device, dtype=dtype).eval()

    # -- the parts, under the names users know ----------------------------------------------------
    @property
    def config(self) -> LDMConfig:
        return self.model.config

    @property
    def unet(self):
        return self.model.unet

    @property
    def vae(self):
        return self.model.first_stage_model

    @property
    def text_encoder(self):
        return self.model.cond_stage_model

    # -- loading and saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device="cpu", dtype=torch.float32, *,
                        config: LDMConfig | str | Path | None = None, prediction_type: str | None = None,
                        use_ema: bool = False, allow_pickle: bool = False) -> "Pipeline":
        """Load our .safetensors, an original SD .safetensors, or a diffusers folder; no path: the
        default model. `config` overrides what a file says or implies: an LDMConfig, an ldm .yaml/.json
        config file, or a diffusers folder of the model (needed for an original file that is not SD1/SD2);
        `prediction_type` too ("v_prediction" for SD2.x-768, which tensor shapes can't tell)."""
        check_device(device)                             # before reading gigabytes
        path = Path(path) if path is not None else default_model_path()
        cfg, sd = checkpoint.load(path, config, prediction_type=prediction_type, use_ema=use_ema,
                                  allow_pickle=allow_pickle)
        with init_empty_weights(include_buffers=False):  # no random init; buffers stay real
            model = LatentDiffusion(cfg)
        checkpoint.load_into(model, sd, str(path))
        return cls(model, device, dtype, source=str(path))

    def save_pretrained(self, path: str | Path, format: str = "ldm", dtype: torch.dtype | None = None):
        """Write as "ldm" (one self-describing .safetensors), "original" or "diffusers"."""
        checkpoint.save(self.model.state_dict(), self.config, path, format, dtype)

    def to(self, device=None, dtype=None) -> "Pipeline":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    # -- the stages -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """list of B prompts -> context (B, L, D); "" is the null condition."""
        tokens = self.text_encoder.tokenize(_as_list(prompts, "prompts"))      # (B, L)
        return self.text_encoder(tokens.to(self.device)).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = True) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        return self.model.encode_first_stage(x.to(self.device, self.dtype), generator, sample)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> x (B, 3, H, W) in [-1, 1] (float32)."""
        return self.model.decode_first_stage(z.to(self.device, self.dtype)).float().clamp(-1, 1)

    def _unet_fn(self):
        """unet(x, t, context) in the pipeline's dtype, returning float32 for the samplers."""
        unet, dtype = self.unet, self.dtype
        return lambda x, t, c: unet(x.to(dtype), t, c).float()

    def _model_fn(self, context, uncond_context, guidance_scale, guidance_rescale=0.0):
        return classifier_free(self._unet_fn(), context, uncond_context, guidance_scale, guidance_rescale)

    # -- text to image ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 sampler: str | None = None, eta: float = 0.0, karras: bool | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", callback=None,
                 guidance_rescale: float = 0.0,
                 regions="auto", regions_from_t: int | None = None):  # new ones last
        """Images for `prompt`: a list of PIL images, a float array (N, H, W, 3) in [0, 1] ("np"),
        or latents ("latent"). Defaults (None) come from the model's config; karras=None follows the
        model's scheduler config (its use_karras_sigmas, for euler and dpmpp_2m). guidance_rescale φ ∈ [0, 1]:
        CFG rescale (Lin et al. 2023) against overexposure at high guidance_scale; 0 = off.
        regions: boxes with their own prompts (`ldm.regions.Region` or (prompt, (left, top, right,
        bottom)) pairs), one list for every prompt or a list per prompt; "auto" plans them with the
        model's layout planner (`LDMConfig.layout_planner`) if it has one; None = off. They guide
        the steps at t ≥ regions_from_t (default: the model's)."""
        cfg = self.config
        steps = cfg.default_steps if steps is None else steps
        guidance_scale = cfg.default_guidance_scale if guidance_scale is None else guidance_scale
        sampler = cfg.default_sampler if sampler is None else sampler
        height = cfg.sample_size if height is None else height
        width = cfg.sample_size if width is None else width
        prompts = _as_list(prompt, "prompt")
        negatives, steps, guidance_scale, height, width, num_images_per_prompt, seed = self._check(
            prompts, negative_prompt, steps, guidance_scale, height, width, sampler, output_type,
            num_images_per_prompt, seed, eta, karras)
        karras = karras_of(resolve(cfg.schedule, sampler), sampler, karras)
        check_guidance_rescale(guidance_rescale)                                # before any work
        per_prompt = self._regions(prompts, regions)
        regions_from_t = self._check_regions_from_t(regions_from_t)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        per_prompt = [r for r in per_prompt for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        f = cfg.autoencoder.downsample_factor
        shape = (len(prompts), cfg.unet.in_channels, height // f, width // f)
        if generator is None:
            seed = random.randrange(2 ** 32) if seed is None else seed
            generator = torch.Generator("cpu").manual_seed(seed)
        if latents is None:  # diffusers' convention: drawn on the CPU generator, then moved
            latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {len(prompts)} image(s) of "
                             f"{height}×{width}, got {tuple(latents.shape)}")
        latents = latents.to(self.device, torch.float32)

        context = self.encode_prompt(prompts)                                   # (N, L, D)
        uncond_context = None
        if guidance_scale != 1:
            unique = list(dict.fromkeys(negatives))                            # the null prompt once
            enc = self.encode_prompt(unique)                                    # (U, L, D)
            uncond_context = enc[[unique.index(n) for n in negatives]]          # (N, L, D)
        uncond_context = uncond_context if uncond_context is not None else context
        model_fn = self._model_fn(context, uncond_context, guidance_scale, guidance_rescale)
        if any(per_prompt):
            model_fn = self._regional(per_prompt, shape, context, uncond_context, guidance_scale,
                                      guidance_rescale, regions_from_t)(model_fn)
        z0 = sample(sampler, model_fn, latents, cfg.schedule, steps, eta=eta, karras=karras,
                    generator=generator, callback=callback)                    # (N, C, h, w)
        if output_type == "latent":
            return z0
        x = self.decode_latents(z0)                                             # (N, 3, H, W)
        if output_type == "np":
            return ((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        images = to_pil(x)
        params = dict(steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                      sampler=sampler + ("_karras" if karras else ""), seed=seed, height=height,
                      width=width)
        for i, (img, p, n, rs) in enumerate(zip(images, prompts, negatives, per_prompt)):
            img.info.update(params, prompt=p, negative_prompt=n, batch_index=i,
                            regions=[[r.prompt, list(r.box)] for r in rs])
        return images

    def _regions(self, prompts: list[str], regions) -> list[list[Region]]:
        """The regions of each prompt (empty lists when off); errors before any work."""
        if regions is None:
            return [[] for _ in prompts]
        if isinstance(regions, str):
            if regions != "auto":
                raise ValueError(f"regions must be 'auto', None, or a list of (prompt, box) regions, got {regions!r}")
            if self.config.layout_planner is None:
                return [[] for _ in prompts]
            plan = planner(self.config.layout_planner)
            return [plan(p) for p in prompts]
        if not isinstance(regions, (list, tuple)):
            raise TypeError(f"regions must be 'auto', None, or a list of Region / (prompt, box) pairs "
                            f"(or one such list per prompt), got {type(regions).__name__}")
        if all(isinstance(r, Region) or isinstance(r, (list, tuple)) and r and isinstance(r[0], str)
               for r in regions):
            return [as_regions(regions) for _ in prompts]      # one list for every prompt
        if len(regions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(regions)} region lists: give one list "
                             f"of regions for every prompt, or one list per prompt")
        return [as_regions(r) for r in regions]

    def _check_regions_from_t(self, from_t) -> int:
        from_t = self.config.regions_from_t if from_t is None else from_t
        last = self.config.schedule.num_train_timesteps
        if isinstance(from_t, bool) or not isinstance(from_t, (int, float)) or not 0 <= from_t <= last:
            raise ValueError(f"regions_from_t must be a number in [0, {last}] (regions guide the steps "
                             f"at t ≥ it; 0 = every step), got {from_t!r}")
        return from_t

    def _regional(self, per_prompt, shape, context, uncond_context, guidance_scale, guidance_rescale,
                  from_t):
        """Wrapper that makes a CFG model function regional (ldm/regions.py)."""
        flat = [(i, r) for i, rs in enumerate(per_prompt) for r in rs]
        owner = torch.tensor([i for i, _ in flat], device=self.device)                  # (R,)
        masks = torch.stack([box_mask(r.box, *shape[2:]) for _, r in flat]).to(self.device)  # (R, 1, h, w)
        region_context = self.encode_prompt([r.prompt for _, r in flat])                 # (R, L, D)
        return regional_classifier_free(self._unet_fn(), context, uncond_context, region_context, owner,
                                        masks, guidance_scale, from_t, guidance_rescale)

    def _check(self, prompts, negative_prompt, steps, guidance_scale, height, width, sampler,
               output_type, num_images_per_prompt, seed, eta, karras):
        """Validate the arguments of __call__ before any work; returns the negative prompts and the
        numbers as plain Python ints and floats."""
        negatives = [""] * len(prompts) if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts: give one "
                             f"negative prompt, or one per prompt")
        T = self.config.schedule.num_train_timesteps
        steps = as_int(steps, "steps", 1, T, hint=" (at most the training timesteps)")
        guidance_scale = as_float(guidance_scale, "guidance_scale", 0, hint=" (1 = no guidance)")
        f = self.config.autoencoder.downsample_factor
        height, width = as_size(height, "height", f), as_size(width, "width", f)
        if sampler not in SAMPLERS:
            whose = " (the model's default scheduler)" if sampler == self.config.default_sampler else ""
            raise ValueError(f"unknown sampler {sampler!r}{whose}; choose one of {', '.join(SAMPLERS)}")
        check_options(sampler, eta, karras)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        num_images_per_prompt = as_int(num_images_per_prompt, "num_images_per_prompt", 1)
        if seed is not None:
            seed = as_int(seed, "seed", 0, 2 ** 64 - 1)
        self._check_memory(len(prompts) * num_images_per_prompt, height, width)
        return negatives, steps, guidance_scale, height, width, num_images_per_prompt, seed

    def _check_memory(self, batch: int, height: int, width: int) -> None:
        """Refuse a request whose activations can't fit, before any work, instead of dying in the
        allocator. Counts only what surely is held at once: the UNet's skip activations for the
        2×batch CFG rows at the latent size, and the decoder's two widest full-size feature maps."""
        cfg, f = self.config, self.config.autoencoder.downsample_factor
        h, w, size = height // f, width // f, torch.finfo(self.dtype).bits // 8
        unet = cfg.unet.model_channels * sum(m * (cfg.unet.num_res_blocks + 1) / 4 ** i
                                             for i, m in enumerate(cfg.unet.channel_mult))
        decoder = 2 * cfg.autoencoder.ch * cfg.autoencoder.ch_mult[0] * height * width
        need = size * (2 * batch * unet * h * w + batch * decoder)
        have = available_memory(self.device)
        if need > have:
            side = int((have / need) ** 0.5 * min(height, width)) // f * f
            raise ValueError(f"{batch} image(s) of {width}×{height} need at least {need / 2 ** 30:.1f} GiB, "
                             f"and {self.device.type} has {have / 2 ** 30:.1f} GiB available; use fewer "
                             f"images at once or a smaller size (about {side}×{side} fits at this count)")
