"""AUTOMATIC1111's API shapes: the request fields clients send, with A1111's names and defaults
(`modules/processing.py` StableDiffusionProcessing{Txt2Img,Img2Img} and the extra fields of
`modules/api/models.py`, web UI 1.10), its sampler and scheduler names, and the reading of a
request into a `Spec`, what one job draws. Unknown fields are ignored, as A1111's models do."""
from __future__ import annotations

import base64
import binascii
import io
import json
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

# A1111 name -> (our sampler, A1111's aliases, A1111's options); the samplers that are ours exactly.
# In A1111 ≥ 1.9 "DPM++ 2M" under the "automatic" scheduler walks Karras σ's (its options say so).
SAMPLERS = {
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    "Euler a": ("euler_ancestral", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    "Euler": ("euler", ["k_euler"], {}),
    "DDIM": ("ddim", ["ddim"], {}),
    "PLMS": ("pndm", ["plms"], {}),
}
# A1111 scheduler name -> (label, karras): None follows the sampler's default, then the model's
SCHEDULERS = {"automatic": ("Automatic", None), "uniform": ("Uniform", False), "karras": ("Karras", True)}


class RequestError(ValueError):
    """A request that can't be drawn as asked: HTTP 422 with this message."""


class _Processing(BaseModel):
    """StableDiffusionProcessing's fields (every one optional, as A1111's generated models make them)."""
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=2 ** 64 - 1)
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0, allow_inf_nan=False)
    width: int = Field(512, ge=1)
    height: int = Field(512, ge=1)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Processing):
    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(_Processing):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


@dataclass
class Spec:
    """What one job draws: image i with seed seeds[i], each as `ldm generate --seed seeds[i]` would."""
    prompt: str                        # as written, <lora:NAME:w> tags included
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    sampler_name: str                  # A1111's, for the info
    sampler: str                       # ours
    karras: bool | None
    eta: float
    width: int
    height: int
    seeds: list[int]
    batch_size: int
    images: list[Image.Image] | None = None     # img2img: image i starts from images[i % len]
    mask: Image.Image | None = None
    strength: float | None = None
    hires: float | None = None
    hires_strength: float = 0.5


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str, str, bool | None]:
    """(A1111 name, our sampler, karras) as A1111's `get_sampler_and_scheduler`: a name may end with
    a scheduler's name or label ("DPM++ 2M Karras"), which then wins over `scheduler`."""
    key = scheduler or "automatic"
    by_label = {label.lower(): k for k, (label, _) in SCHEDULERS.items()}
    key = by_label.get(key.lower(), key)
    if key not in SCHEDULERS:
        raise RequestError(f"scheduler {scheduler!r} is not available here; use one of {', '.join(SCHEDULERS)}")
    name = name or "Euler"
    for k, (label, _) in SCHEDULERS.items():
        for option in (label, k):
            if k != "automatic" and name.endswith(" " + option):
                key, name = k, name[: -len(option) - 1]
    aliases = {a: n for n, (_, al, _) in SAMPLERS.items() for a in (n, *al)}
    if name not in aliases:
        raise RequestError(f"sampler {name!r} is not available here; use one of {', '.join(SAMPLERS)} "
                           f"(optionally with ' Karras')")
    name = aliases[name]
    ours, _, options = SAMPLERS[name]
    karras = SCHEDULERS[key][1]
    if key == "automatic" and options.get("scheduler") == "karras":
        karras = True
    return name, ours, karras


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image as A1111 takes it: plain, or as a `data:image/...;base64,` URL."""
    if data.startswith("data:image/"):
        data = data.split(",", 1)[-1]
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as im:
            im.load()
            return im.copy()
    except (binascii.Error, OSError, UnidentifiedImageError, ValueError) as e:
        raise RequestError(f"{what}: not a base64-encoded image ({e})") from e


def _resized(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes 0 (just resize) and 1 (crop and resize: cover, then centre crop)."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    return ImageOps.fit(image, (width, height), Image.LANCZOS)


# Fields whose non-default values would change the picture in ways ldm doesn't draw: refused, not
# silently ignored. (Script, saving and sampler-tuning fields without an effect here are ignored.)
def _refuse_unsupported(req: _Processing) -> None:
    checks = [("subseed_strength", req.subseed_strength == 0), ("restore_faces", not req.restore_faces),
              ("tiling", not req.tiling), ("seed_resize_from_h", req.seed_resize_from_h <= 0),
              ("seed_resize_from_w", req.seed_resize_from_w <= 0), ("refiner_checkpoint", not req.refiner_checkpoint)]
    if isinstance(req, Txt2ImgRequest):
        checks += [("hr_second_pass_steps", req.hr_second_pass_steps == 0),
                   ("hr_prompt", req.hr_prompt in ("", None, req.prompt)),
                   ("hr_negative_prompt", req.hr_negative_prompt in ("", None, req.negative_prompt))]
    if isinstance(req, Img2ImgRequest):
        checks += [("resize_mode", req.resize_mode in (0, 1))]
    for field, ok in checks:
        if not ok:
            raise RequestError(f"{field}={getattr(req, field)!r} is not supported by ldm serve; leave it at "
                               f"A1111's default")


def _eta(sampler: str, eta: float | None) -> float:
    """η where A1111 applies it: DDIM's (default 0, its eta_ddim); "Euler a" runs its full ancestral
    noise (A1111's eta_ancestral 1.0), the only one ldm draws; the other samplers ignore it."""
    if sampler == "ddim":
        eta = 0.0 if eta is None else eta
        if not 0 <= eta <= 1:
            raise RequestError(f"eta must be in [0, 1] for DDIM, got {eta}")
        return float(eta)
    if sampler == "euler_ancestral" and eta not in (None, 1.0):
        raise RequestError(f"eta={eta} with 'Euler a': ldm draws the full ancestral noise only (eta 1.0)")
    return 0.0


def to_spec(req: _Processing) -> Spec:
    """The job a request asks for; RequestError (422) before any work for what can't be drawn."""
    _refuse_unsupported(req)
    name, ours, karras = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    n = req.batch_size * req.n_iter
    seed = random.randrange(2 ** 32) if req.seed == -1 else req.seed
    spec = Spec(req.prompt, req.negative_prompt or None, req.steps, req.cfg_scale, name, ours, karras,
                _eta(ours, req.eta), req.width, req.height, [seed + i for i in range(n)], req.batch_size)
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        spec.hires, spec.hires_strength = _hires(req), _strength(req.denoising_strength)
    if isinstance(req, Img2ImgRequest):
        _img2img(req, spec)
    return spec


def _hires(req: Txt2ImgRequest) -> float:
    """The hires scale: hr_scale, or the one hr_resize_x / hr_resize_y imply."""
    scales = {x / size for x, size in ((req.hr_resize_x, req.width), (req.hr_resize_y, req.height)) if x}
    if len(scales) > 1:
        raise RequestError("hr_resize_x and hr_resize_y give different scales; ldm's hires fix keeps the "
                           "aspect ratio: give one of them, or hr_scale")
    scale = scales.pop() if scales else req.hr_scale
    if not 1 <= scale <= 8:
        raise RequestError(f"the hires scale must be in [1, 8], got {scale}")
    return float(scale)


def _strength(value: float | None) -> float:
    if value is None or not 0 < value <= 1:
        raise RequestError(f"denoising_strength must be in (0, 1], got {value}")
    return float(value)


def _img2img(req: Img2ImgRequest, spec: Spec) -> None:
    """Init images resized to width × height by resize_mode, as A1111; the mask (white = repaint,
    inpainting_mask_invert=1 flips it) with them. Several init images: image i ↔ draw i."""
    if not req.init_images:
        raise RequestError("init_images is empty: img2img needs at least one base64 image")
    if len(req.init_images) > req.batch_size:
        raise RequestError(f"{len(req.init_images)} init_images for batch_size {req.batch_size}: give one "
                           f"image, or at most batch_size")
    spec.images = [_resized(decode_image(d, f"init_images[{i}]").convert("RGB"), req.width, req.height,
                            req.resize_mode) for i, d in enumerate(req.init_images)]
    spec.strength = _strength(req.denoising_strength)
    if req.mask:
        mask = decode_image(req.mask, "mask").convert("L")
        mask = ImageOps.invert(mask) if req.inpainting_mask_invert else mask
        spec.mask = _resized(mask, req.width, req.height, req.resize_mode)


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')     # A1111's re_param_code


def parse_infotext(text: str) -> dict:
    """A `parameters` text as A1111's parse_generation_parameters reads it: Prompt, Negative prompt,
    then each `Key: value` of the last line ("Size: WxH" as Size-1, Size-2)."""
    *lines, last = (text or "").strip().split("\n")
    if len(_PARAM.findall(last)) < 3:          # no settings line: the whole text is the prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = json.loads(value) if value.startswith('"') and value.endswith('"') else value
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out
