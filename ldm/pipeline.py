"""Text-to-image as one straight line: prompt -> context -> guided sampling of latents -> decoder
-> images. Loading and saving (`from_pretrained`, `save_pretrained`) go through checkpoint.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from PIL import Image

from . import checkpoint, precision
from .config import LDMConfig
from .diffusion import LatentDiffusion
from .checks import check_device
from .prompt_syntax import check_syntax, encode_weighted, pad_chunks
from .guidance import cfg, check_classifier_scale, classifier_free, only_from, prompt_rows, with_channels
from .regions import box_mask, regional_rows
from .request import Images, Request, as_prompts, check_request
from .schedule import alphas_cumprod, q_sample
from .tiling import TILE, decode_tiled
from .samplers import sample
from .unclip import Condition, class_vector_unet, embedding_condition, image_embeddings

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "ldm-default.safetensors"
# the default model's noisy classifier (classifier guidance; train_classifier.py), beside it in weights/
DEFAULT_CLASSIFIER = DEFAULT_MODEL.with_name("ldm-default-classifier.safetensors")
# and its prior (text -> CLIP image embedding; train_unclip.py part=prior), for use_prior=True (ldm/prior.py attach)
DEFAULT_PRIOR = DEFAULT_MODEL.with_name("ldm-default-prior.safetensors")


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


class Pipeline:
    def __init__(self, model: LatentDiffusion, device="cpu", dtype: torch.dtype = torch.float32,
                 source: str | None = None):
        self.device, self.source = check_device(device), source
        self.dtype = precision.resolve(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype,
                              memory_format=precision.memory_format(self.dtype)).eval()

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
        dtype = precision.resolve(dtype, check_device(device), warn=False)   # before reading gigabytes
        path = Path(path) if path is not None else default_model_path()
        cfg, sd = checkpoint.load(path, config, prediction_type=prediction_type, use_ema=use_ema,
                                  allow_pickle=allow_pickle)
        with init_empty_weights(include_buffers=False):  # no random init; buffers stay real
            model = LatentDiffusion(cfg)
        checkpoint.load_into(model, sd, str(path), dtype)
        return cls(model, device, dtype, source=str(path))

    def save_pretrained(self, path: str | Path, format: str = "ldm", dtype: torch.dtype | None = None):
        """Write as "ldm" (one self-describing .safetensors), "original" or "diffusers"."""
        checkpoint.save(self.model.state_dict(), self.config, path, format, dtype)

    def to(self, device=None, dtype=None) -> "Pipeline":
        self.device = check_device(device) if device is not None else self.device
        self.dtype = precision.resolve(dtype, self.device) if dtype is not None else self.dtype
        self.model.to(device=self.device, dtype=self.dtype, memory_format=precision.memory_format(self.dtype))
        return self

    def compile(self, mode: str | None = None) -> "Pipeline":
        """torch.compile the UNet in place (its parameter names, LoRA merging and saving unchanged).
        The first call at each shape compiles (tens of seconds); later calls run the fused graph.
        mode: torch.compile's ("max-autotune" on a GPU: autotuned kernels and CUDA graphs)."""
        self.unet.compile(mode=mode, dynamic=False)
        return self

    # -- LoRA (ldm/lora.py) -------------------------------------------------------------------------
    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None, merge: bool = True) -> str:
        """Merge a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors) into the weights with
        multiplier `scale`, or with merge=False add it unmerged beside them (x·W + s·(x·A)·B);
        returns its name (default: the file's stem). Errors before any change."""
        from .lora import LoraSet
        self._lora = getattr(self, "_lora", None) or LoraSet()
        return self._lora.load(self.model, path, scale, name, merge)

    def unload_lora(self, name: str | None = None) -> None:
        """Take a LoRA out (None: all of them), restoring the base weights bit for bit."""
        if getattr(self, "_lora", None) is not None:
            self._lora.unload(self.model, name)
        elif name is not None:
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: none)")

    @property
    def loras(self) -> dict[str, tuple[str, float, str]]:
        """The loaded LoRAs: name -> (path, scale, sha256 of the file[:10])."""
        return self._lora.records() if getattr(self, "_lora", None) is not None else {}

    # -- the stages -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], prompt_syntax: str = "plain") -> torch.Tensor:
        """list of B prompts -> context (B, L, D); "" is the null condition. prompt_syntax "plain":
        as diffusers (truncated at the encoder's max_length, with a warning); "a1111": A1111's
        chunks of 75 tokens (L = 77·k) and (word:1.3) weights (ldm/prompt_syntax.py)."""
        prompts = as_prompts(prompts, "prompts")
        if check_syntax(prompt_syntax, self.config.text_encoder) == "a1111":
            return encode_weighted(self.text_encoder, prompts, self.device).to(self.dtype)
        tokens = self.text_encoder.tokenize(prompts)                                # (B, L)
        return self.text_encoder(tokens.to(self.device)).to(self.dtype)

    @torch.no_grad()
    def encode_image_embedding(self, images) -> torch.Tensor:
        """PIL RGB image(s) -> CLIP image embeddings (B, D), CLIP's preprocessing included (a model
        with an image encoder: image variations, Stable unCLIP)."""
        return image_embeddings(self, images)

    def interpolate(self, prompts=None, seeds=(0, 1), frames: int = 8, images=None, **kwargs) -> list:
        """`frames` images walking from (prompts[0], seeds[0]) to (prompts[1], seeds[1]) (or between two
        images' embeddings, `images=`): slerp of the start noise, slerp of the conditions; the first and
        last frames are the plain calls' images. ldm/interpolate.py."""
        from .interpolate import interpolate
        return interpolate(self, prompts, seeds, frames, images, **kwargs)

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = True) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        return self.model.encode_first_stage(x.to(self.device, self.dtype), generator, sample)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Scaled latents -> x (B, 3, H, W) in [-1, 1] (float32). tiled=None: in tiles (ldm/tiling.py)
        once the latents exceed (2·TILE)² cells, e.g. past 1024² px at f = 8, so memory stays bounded."""
        z = z.to(self.device, self.dtype)
        if tiled or tiled is None and z.shape[2] * z.shape[3] > (2 * TILE) ** 2:
            x = decode_tiled(self.model.decode_first_stage, z, self.config.autoencoder.downsample_factor)
        else:
            x = self.model.decode_first_stage(z)
        return x.float().clamp(-1, 1)

    def _unet_fn(self, label: int | None = None):
        """unet(x, t, context) in the pipeline's dtype, returning float32 for the samplers; `label`:
        every row's class label (an upscaler's noise_level)."""
        unet, dtype = self.unet, self.dtype
        if label is None:
            return lambda x, t, c: unet(x.to(dtype), t, c).float()
        return lambda x, t, c: unet(x.to(dtype), t, c, y=torch.full_like(t, label, dtype=torch.long)).float()

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 sampler: str | None = None, eta: float = 0.0, karras: bool | None = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", callback=None,
                 guidance_rescale: float = 0.0, regions="auto", regions_from_t: int | None = None,
                 guidance: list | tuple = (), image=None, mask_image=None, strength: float | None = None,
                 noise_level: int | None = None, prompt_syntax: str = "plain", prior_steps: int | None = None,
                 prior_guidance_scale: float | None = None, classifier_scale: float = 0.0, use_prior: bool = False):
        """Images for `prompt`: `Images` (a list of PIL images whose `.request` records the settings),
        a float array (N, H, W, 3) in [0, 1] ("np"), or latents ("latent"). Defaults (None) come from
        the model's config; karras=None follows the model's scheduler config (its use_karras_sigmas).
        guidance_rescale φ ∈ [0, 1]: CFG rescale (Lin et al. 2023) against overexposure at high
        guidance_scale; 0 = off. regions: boxes with their own prompts (`ldm.regions.Region` or
        (prompt, (left, top, right, bottom)) pairs), one list for every prompt or a list per prompt;
        "auto" plans them with the model's layout planner if it has one; None = off. They guide the
        steps at t ≥ regions_from_t (default: the model's). guidance: more wrappers model_fn ->
        model_fn (ldm/guidance.py), applied after CFG in order.
        image (a PIL image, one per prompt, or a tensor (B, 3, H, W) in [-1, 1]): img2img (SDEdit),
        the last int(steps · strength) steps from its noised latents (strength default 0.8); with
        mask_image (white = repaint): inpainting (strength default 1.0), by a 9-channel inpainting
        UNet's extra inputs or, for any other model, by putting the known latents back after every
        step. An upscaler model (SD x4) takes the low-res image and noise_level (default 20) and
        returns the image ×4. Seeds give diffusers' images (its pipelines' order of random draws).
        prompt_syntax: "plain" (diffusers') or "a1111" (long prompts, (word:1.3); `encode_prompt`).
        The DALL·E 2 family (ldm/unclip.py): an image-variation model takes image= and no prompt; a Stable
        unCLIP model a prompt and image= (noise_level noises its embedding, default 0), or, with a prior,
        the prompt alone (prior_steps / prior_guidance_scale: the prior's, default 25 and 4.0). A text model
        that draws variations (an image adapter, as the default model) goes text -> prior -> image
        embedding -> adapter with use_prior=True and a prior attached (ldm.prior.attach).
        classifier_scale s > 0: classifier guidance by the noisy classifier attached to the pipeline
        (`pipe.classifier`; the default model's: ldm/shapes/noisy_classifier.py), toward what each
        prompt names; guidance_scale=1 isolates it."""
        classifier_scale = check_classifier_scale(self, classifier_scale)
        req = check_request(self, prompt, negative_prompt, steps, guidance_scale, height, width, seed,
                            generator, sampler, eta, karras, num_images_per_prompt, output_type,
                            guidance_rescale, regions, regions_from_t, guidance, image, mask_image, strength,
                            noise_level, latents, prompt_syntax, prior_steps, prior_guidance_scale, use_prior)
        if classifier_scale:              # one more wrapper, after CFG: ε − s √(1−ᾱ) ∇ log p_φ(y | z_t)
            from dataclasses import replace
            req = replace(req, guidance=req.guidance + (self.classifier.guidance(self, req.prompts, classifier_scale),))
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(req.seed)
        return self._draw(req, generator, latents, callback)

    def _draw(self, req: Request, generator: torch.Generator, latents=None, callback=None,
              condition: Condition | None = None):
        """The checked request's images: its image-embedding condition (drawn first, or given:
        `interpolate`), the start latents, the guided model function, sampling, decoding."""
        condition = embedding_condition(self, req, generator) if condition is None else condition
        noise, init, keep, extra = self._start(req, generator, latents)
        model_fn = self.denoiser(req, extra, condition)
        z0 = sample(req.sampler, model_fn, noise, self.config.schedule, req.steps, eta=req.eta,
                    karras=req.karras, generator=generator, callback=callback, init=init,
                    strength=req.strength or 1.0, keep=keep)                  # (N, C, h, w)
        if req.output_type == "latent":
            return z0
        x = self.decode_latents(z0)                                             # (N, 3, H, W)
        if req.output_type == "np":
            return ((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        return Images(to_pil(x), req)

    def _start(self, req: Request, generator: torch.Generator, latents: torch.Tensor | None):
        """(noise, init latents, (known latents, mask) to keep, extra UNet inputs), drawn from the
        generator in diffusers' order: the image's posterior sample, the noise, the masked image's."""
        def noise_now() -> torch.Tensor:   # diffusers' convention: drawn on the generator's device
            z = latents if latents is not None else torch.randn(
                req.latent_shape, generator=generator, device=generator.device, dtype=torch.float32)
            return z.to(self.device, torch.float32)
        if req.image is None:
            return noise_now(), None, None, None
        n = req.latent_shape[0]
        per_image = lambda z: z.repeat_interleave(n // len(z), 0).float()       # noqa: E731  image i ↔ prompt i
        image = req.image.to(self.device)
        if req.noise_level is not None:      # upscaler: the low-res image noised by its own schedule
            low_noise = torch.randn(image.shape, generator=generator, device=generator.device).to(self.device)
            ac = alphas_cumprod(self.config.low_res_schedule)
            return noise_now(), None, None, (per_image(q_sample(image, req.noise_level, low_noise, ac)),)
        nine = self.config.image_conditioning == "inpaint"
        encoded = None if nine and req.strength == 1 else per_image(self.encode_image(image, generator))
        noise = noise_now()
        if not req.inpainting:
            return noise, encoded, None, None
        mask = req.mask.to(self.device)
        masked = per_image(self.encode_image(image * (mask < 0.5), generator))   # the known pixels only
        mask = per_image(F.interpolate(mask, size=req.latent_shape[2:]))         # nearest, as diffusers
        init = encoded if req.strength < 1 else None                              # 1: from pure noise
        return noise, init, None if nine else (encoded, mask), (mask, masked) if nine else None

    def denoiser(self, req: Request, extra: tuple[torch.Tensor, ...] | None = None,
                 condition: Condition | None = None):
        """The model function the sampler sees: the prompt's rows (regional at t ≥ regions_from_t),
        CFG against the negative prompts in the same batched call, the extra input channels of an
        inpainting UNet (concatenated to every row), then `req.guidance`'s wrappers. The convenient
        keywords become guidance here, and only here. `condition` (ldm/unclip.py): an image embedding
        as the context (null: zeros) or as the UNet's class vector (null: zeros)."""
        syntax = req.prompt_syntax
        if condition is not None and condition.context is not None:
            context, uncond_context = condition.context, condition.null_context   # (N, L, D)
            uncond_context = torch.zeros_like(context) if uncond_context is None else uncond_context
        else:
            context = self.encode_prompt(req.prompts, syntax)                   # (N, L, D)
            uncond_context = context
            if req.guidance_scale != 1:
                unique = list(dict.fromkeys(req.negatives))                     # the null prompt once
                enc = self.encode_prompt(unique, syntax)                        # (U, L, D)
                uncond_context = enc[[unique.index(n) for n in req.negatives]]  # (N, L, D)
        flat = [(i, r) for i, rs in enumerate(req.regions) for r in rs]
        region_context = self.encode_prompt([r.prompt for _, r in flat], syntax) if flat else None  # (R, L, D)
        # a1111: contexts of fewer 77-token chunks padded with the empty prompt's, for ONE batched call
        context, uncond_context, region_context = pad_chunks(lambda: self.encode_prompt([""], syntax),
                                                             context, uncond_context, region_context)
        prompt = prompt_rows(context)
        if flat:
            owner = torch.tensor([i for i, _ in flat], device=self.device)                       # (R,)
            masks = torch.stack([box_mask(r.box, *req.latent_shape[2:]) for _, r in flat])      # (R, 1, h, w)
            prompt = only_from(req.regions_from_t, regional_rows(context, region_context, owner,
                                                                 masks.to(self.device)), prompt)
        combine = cfg(req.guidance_scale, req.guidance_rescale)
        vector = condition.vector if condition is not None else None
        unet = self._unet_fn(req.noise_level) if vector is None else class_vector_unet(self.unet, self.dtype, vector)
        model_fn = classifier_free(unet, prompt, uncond_context, req.guidance_scale, combine)
        if extra is not None:
            model_fn = with_channels(model_fn, *extra)
        for wrap in req.guidance:
            model_fn = wrap(model_fn)
        return model_fn
