"""One call's arguments, checked and resolved before any work: `check_request` turns what the user
passed to `Pipeline.__call__` into a `Request` (defaults filled from the model's config, prompts
repeated per image, regions planned), and `Request.record(i)` is image i's record of the settings,
the one source of the PNG parameters the CLI writes."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .checks import as_float, as_int, as_size, available_memory
from .guidance import check_guidance_rescale
from .planners import planner
from .prompt_syntax import check_syntax
from .regions import Region, as_regions
from .image_inputs import as_images, as_masks
from .tiling import TILE
from .unclip import check_embedding_inputs
from .samplers import SAMPLERS, check_options, effective_name, steps_run

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass(frozen=True)
class Request:
    prompts: list[str]                 # one per image (each prompt repeated num_images_per_prompt times)
    negatives: list[str]               # the null condition of each image ("" unless given)
    regions: list[list[Region]]        # each image's boxes (empty: none)
    steps: int
    guidance_scale: float
    guidance_rescale: float
    sampler: str                       # as asked ("dpmpp_2m"); `sampler_name` adds what karras makes it
    karras: bool | None
    sampler_name: str                  # what ran, e.g. "dpmpp_2m_karras"
    eta: float
    height: int
    width: int
    seed: int | None                   # None when the caller passed a generator
    regions_from_t: float
    guidance: tuple                    # extra model_fn -> model_fn wrappers, applied last
    output_type: str
    latent_shape: tuple[int, int, int, int]
    image: torch.Tensor | None = None  # (1 or P, 3, H, W) in [-1, 1]: img2img / inpainting
    mask: torch.Tensor | None = None   # (1 or P, 1, H, W), 1 = repaint
    strength: float | None = None      # with an image: the share of the steps run from its noised latents
    steps_run: int = 0
    noise_level: int | None = None     # an upscaler's: how much the low-res image is noised (its class label)
    prompt_syntax: str = "plain"       # "plain" (diffusers') | "a1111" (75-token chunks, (word:1.3) weights)
    embedding_images: list | None = None  # the DALL·E 2 family: the PIL images whose CLIP embedding conditions
    prior_steps: int | None = None        # unCLIP from text: the prior's DDPM steps and guidance (ldm/prior.py)
    prior_guidance_scale: float | None = None
    use_prior: bool = False               # text -> prior -> embedding on a text model with an image adapter

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    def record(self, i: int) -> dict:
        """Image i's settings, as the PNG parameters name them."""
        return dict(prompt=self.prompts[i], negative_prompt=self.negatives[i], steps=self.steps,
                    guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                    sampler=self.sampler_name, seed=self.seed, height=self.height, width=self.width,
                    batch_index=i, regions=[[r.prompt, list(r.box)] for r in self.regions[i]],
                    strength=self.strength, steps_run=self.steps_run, inpainting=self.inpainting,
                    noise_level=self.noise_level, prompt_syntax=self.prompt_syntax,
                    prior_steps=self.prior_steps, prior_guidance_scale=self.prior_guidance_scale)


class Images(list):
    """The generated PIL images, with `.request`: the checked settings that drew them."""

    def __init__(self, images, request: Request):
        super().__init__(images)
        self.request = request
        for i, image in enumerate(self):
            image.info.update(request.record(i))       # PIL's own place for text metadata


def as_prompts(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{what} is an empty list: give at least one prompt")
    return list(prompts)


def check_request(pipe, prompt, negative_prompt, steps, guidance_scale, height, width, seed, generator,
                  sampler, eta, karras, num_images_per_prompt, output_type, guidance_rescale, regions,
                  regions_from_t, guidance, image=None, mask_image=None, strength=None,
                  noise_level=None, latents=None, prompt_syntax="plain", prior_steps=None,
                  prior_guidance_scale=None, use_prior=False) -> Request:
    """Every argument of Pipeline.__call__ checked once, in order, with a message that says what to
    do; None takes the model's default. Nothing here touches a network."""
    cfg = pipe.config
    embedding = {}
    # a text-to-image model that also draws variations (an image adapter beside its text encoder) takes
    # the embedding path only for image= without a prompt
    text_too = cfg.image_embedding == "context" and cfg.text_encoder is not None
    if not isinstance(use_prior, bool):
        raise TypeError(f"use_prior must be True or False, got {use_prior!r}")
    if use_prior and cfg.prior is None and not (text_too and getattr(pipe, "prior", None) is not None):
        raise ValueError("use_prior=True draws the image embedding from the text by a prior, and this model has "
                         "none: " + ("attach one first (ldm.prior.attach(pipe, ldm.pipeline.DEFAULT_PRIOR) for the "
                                     "default model)" if text_too else "it belongs to Stable unCLIP models and to "
                                     "text-to-image models with an image adapter"))
    if cfg.image_embedding is not None and (use_prior or not (text_too and (prompt is not None or image is None))):
        # image variations / Stable unCLIP: image= is the embedding's source, or the prior draws it
        attached = getattr(pipe, "prior", None) if use_prior and text_too else None
        prompt, embedding = check_embedding_inputs(cfg, prompt, image, mask_image, strength, noise_level,
                                                   prior_steps, prior_guidance_scale, use_prior,
                                                   attached.schedule if attached is not None else None)
        image = mask_image = strength = noise_level = None
        regions = None if isinstance(regions, str) and regions == "auto" else regions   # (no layout plan)
    elif prior_steps is not None or prior_guidance_scale is not None:
        raise ValueError("prior_steps / prior_guidance_scale apply with a prior (use_prior=True, or a Stable "
                         "unCLIP model with one); this call has none")
    prompts = as_prompts(prompt, "prompt")
    negatives = _negatives(negative_prompt, len(prompts))
    check_syntax(prompt_syntax, cfg.text_encoder)
    T = cfg.schedule.num_train_timesteps
    steps = as_int(cfg.default_steps if steps is None else steps, "steps", 1, T,
                   hint=" (at most the training timesteps)")
    guidance_scale = as_float(cfg.default_guidance_scale if guidance_scale is None else guidance_scale,
                              "guidance_scale", 0, hint=" (1 = no guidance)")
    f = cfg.autoencoder.downsample_factor
    images, masks, strength, noise_level = _image_inputs(cfg, len(prompts), image, mask_image, strength,
                                                         noise_level)
    if images is not None:
        scale = f if noise_level is not None else 1         # an upscaler's latents are the low-res size
        height, width = _image_size(images, height, width, scale)
    height = as_size(cfg.sample_size if height is None else height, "height", f)
    width = as_size(cfg.sample_size if width is None else width, "width", f)
    sampler = cfg.default_sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
        whose = " (the model's default scheduler)" if sampler == cfg.default_sampler else ""
        raise ValueError(f"unknown sampler {sampler!r}{whose}; choose one of {', '.join(SAMPLERS)}")
    check_options(sampler, eta, karras)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    n = as_int(num_images_per_prompt, "num_images_per_prompt", 1)
    if seed is not None:
        seed = as_int(seed, "seed", 0, 2 ** 64 - 1)
    elif generator is None:
        seed = random.randrange(2 ** 32)
    check_memory(pipe, len(prompts) * n, height, width)
    guidance_rescale = check_guidance_rescale(guidance_rescale)
    per_prompt = _regions(cfg, prompts, regions)
    if embedding and (any(per_prompt) or cfg.image_embedding == "context" and negative_prompt):
        raise ValueError("an image-embedding model takes no regional prompts (pass regions=None), and an "
                         "image-variation model no negative_prompt (its null condition is the zero embedding)")
    regions_from_t = _regions_from_t(cfg, regions_from_t)
    if not isinstance(guidance, (list, tuple)) or not all(callable(g) for g in guidance):
        raise TypeError("guidance must be a list of functions model_fn -> model_fn (see ldm/guidance.py), "
                        f"got {guidance!r}")
    shape = (len(prompts) * n, cfg.unet.out_channels, height // f, width // f)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for {shape[0]} image(s) of {height}×{width}, "
                         f"got {tuple(latents.shape)}")
    repeat = lambda items: [item for item in items for _ in range(n)]   # noqa: E731
    name = effective_name(sampler, cfg.schedule, karras)
    return Request(repeat(prompts), repeat(negatives), repeat(per_prompt), steps, guidance_scale,
                   guidance_rescale, sampler, karras, name, float(eta), height, width, seed,
                   regions_from_t, tuple(guidance), output_type, shape, images, masks,
                   strength, steps_run(name, steps, 1.0 if strength is None else strength),
                   embedding.pop("noise_level", noise_level), prompt_syntax, **embedding)


def _image_inputs(cfg, n_prompts: int, image, mask_image, strength, noise_level):
    """(images, masks, strength, noise_level) checked for the model's kind (`image_conditioning`):
    strength in (0, 1], defaulting to diffusers' 0.8 for img2img and 1.0 for inpainting; a 9-channel
    inpainting UNet needs an image and its mask, an upscaler a low-res image and a noise level."""
    kind = cfg.image_conditioning
    given = [name for name, v in (("mask_image", mask_image), ("strength", strength),
                                  ("noise_level", noise_level)) if v is not None]
    if image is None:
        if kind is not None:
            needs = "image= and mask_image=" if kind == "inpaint" else "image= (the low-res image)"
            raise ValueError(f"this is an {'inpainting' if kind == 'inpaint' else 'upscaler'} model: pass {needs}")
        if given:
            raise ValueError(f"{given[0]} applies to an image: pass image= too (img2img / inpainting)")
        return None, None, None, None
    if kind == "upscale":
        if mask_image is not None or strength is not None:
            raise ValueError("an upscaler takes image= and noise_level=, not mask_image= or strength=")
        noise_level = as_int(20 if noise_level is None else noise_level, "noise_level", 0, cfg.max_noise_level,
                             hint=" (how much the low-res image is noised; 20 as diffusers)")
        factor = 2 ** (len(cfg.unet.channel_mult) - 1)          # the UNet runs at the image's size
        return as_images(image, n_prompts, factor), None, None, noise_level
    if noise_level is not None:
        raise ValueError("noise_level applies to upscaler models (SD x4 upscaler); this one is not")
    if kind == "inpaint" and mask_image is None:
        raise ValueError("this is an inpainting model (9 input channels): pass mask_image= with the image")
    strength = (1.0 if mask_image is not None else 0.8) if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the share of the steps run from the noised "
                         f"image; 1 = from noise), got {strength!r}")
    images = as_images(image, n_prompts, cfg.autoencoder.downsample_factor)
    masks = None if mask_image is None else as_masks(mask_image, images)
    return images, masks, float(strength), None


def _image_size(images: torch.Tensor, height, width, scale: int = 1) -> tuple[int, int]:
    """The output size is the image's (× an upscaler's factor); height/width, if given, must agree."""
    h, w = images.shape[2] * scale, images.shape[3] * scale
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"height/width ({height}, {width}) differ from the image's size ({h}, {w}): "
                         f"the output has the image's size, so leave them out or resize the image")
    return h, w


def _negatives(negative_prompt, n: int) -> list[str]:
    negatives = [""] * n if negative_prompt is None else as_prompts(negative_prompt, "negative_prompt")
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise ValueError(f"{n} prompts but {len(negatives)} negative prompts: give one "
                         f"negative prompt, or one per prompt")
    return negatives


def _regions(cfg, prompts: list[str], regions) -> list[list[Region]]:
    """The regions of each prompt (empty lists when off)."""
    if regions is None:
        return [[] for _ in prompts]
    if isinstance(regions, str):
        if regions != "auto":
            raise ValueError(f"regions must be 'auto', None, or a list of (prompt, box) regions, got {regions!r}")
        if cfg.layout_planner is None:
            return [[] for _ in prompts]
        plan = planner(cfg.layout_planner)
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


def _regions_from_t(cfg, from_t) -> float:
    from_t = cfg.regions_from_t if from_t is None else from_t
    last = cfg.schedule.num_train_timesteps
    if isinstance(from_t, bool) or not isinstance(from_t, (int, float)) or not 0 <= from_t <= last:
        raise ValueError(f"regions_from_t must be a number in [0, {last}] (regions guide the steps "
                         f"at t ≥ it; 0 = every step), got {from_t!r}")
    return from_t


def check_memory(pipe, batch: int, height: int, width: int) -> None:
    """Refuse a request whose activations can't fit, before any work, instead of dying in the
    allocator. Counts only what surely is held at once: the UNet's skip activations for the
    2×batch CFG rows at the latent size, and the decoder's two widest full-size feature maps."""
    cfg, f = pipe.config, pipe.config.autoencoder.downsample_factor
    h, w, size = height // f, width // f, torch.finfo(pipe.dtype).bits // 8
    unet = cfg.unet.model_channels * sum(m * (cfg.unet.num_res_blocks + 1) / 4 ** i
                                         for i, m in enumerate(cfg.unet.channel_mult))
    tile = (2 * TILE * f) ** 2                      # past that, the decoder runs tile by tile (ldm/tiling.py)
    decoder = 2 * cfg.autoencoder.ch * cfg.autoencoder.ch_mult[0] * min(height * width, tile)
    need = size * (2 * batch * unet * h * w + (batch if height * width <= tile else 1) * decoder)
    have = available_memory(pipe.device)
    if need > have:
        side = int((have / need) ** 0.5 * min(height, width)) // f * f
        raise ValueError(f"{batch} image(s) of {width}×{height} need at least {need / 2 ** 30:.1f} GiB, "
                         f"and {pipe.device.type} has {have / 2 ** 30:.1f} GiB available; use fewer "
                         f"images at once or a smaller size (about {side}×{side} fits at this count)")

