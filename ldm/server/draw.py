"""One job's images: a `Spec` drawn on the loaded pipeline exactly as `ldm generate` draws it (the
same library calls, the CLI's prompt syntax and regions, the prompt's <lora:…> tags merged for the
job), each image by itself from its own seed, as A1111's seeds mean; PNGs with `ldm generate`'s
parameters."""
from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..outputs import png_parameters, save_image
from ..samplers import effective_name, steps_run
from .a1111 import Spec


class Interrupted(Exception):
    """Raised from the step callback: /interrupt stops the job at the next step."""


@dataclass
class Drawn:
    images: list[str] = field(default_factory=list)        # base64 PNGs (no data: prefix)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    interrupted: bool = False


def total_steps(pipe, spec: Spec) -> int:
    """The sampler steps the job runs (for /progress), as `sample` counts them."""
    name = effective_name(spec.sampler, pipe.config.schedule, spec.karras)
    one = steps_run(name, spec.steps, spec.strength or 1.0)
    if spec.hires is not None:
        one += steps_run(name, spec.steps, spec.hires_strength)
    return one * len(spec.seeds)


def check_loras(spec: Spec, lora_dir: Path | None) -> tuple[str, list]:
    """(the prompt without its <lora:NAME:w> tags, [(file, scale)]), each file read and checked
    now, as `ldm generate --lora-dir` does."""
    from ..cli import lora_requests
    return lora_requests(SimpleNamespace(lora=[], lora_dir=lora_dir), spec.prompt)


def draw(pipe, model: Path, model_hash: str, spec: Spec, lora_dir: Path | None, on_step) -> Drawn:
    """Image i as `ldm generate PROMPT --seed seeds[i]` (with --image/--mask/--strength or --hires)
    draws it. `on_step(d)` runs after every sampler step and may raise Interrupted, which ends
    the job with the images finished before it."""
    from ..batch import loras_loaded
    from ..cli import _draw, _free_name
    prompt, loras = check_loras(spec, lora_dir)
    syntax = "plain" if pipe.config.text_encoder.kind == "t5" else "a1111"
    args = SimpleNamespace(command="generate", prompt=prompt, height=None if spec.images else spec.height,
                           width=None if spec.images else spec.width, hires=spec.hires,
                           hires_strength=spec.hires_strength, strength=spec.strength)
    out = Drawn()
    with loras_loaded(pipe, loras, _free_name):
        for i, seed in enumerate(spec.seeds):
            kw = dict(negative_prompt=spec.negative_prompt, steps=spec.steps, guidance_scale=spec.guidance_scale,
                      guidance_rescale=0.0, seed=seed, sampler=spec.sampler, karras=spec.karras, eta=spec.eta,
                      num_images_per_prompt=1, regions="auto", prompt_syntax=syntax, callback=on_step)
            image = spec.images[i % len(spec.images)] if spec.images else None
            try:
                images = _draw(args, pipe, image, spec.mask, kw)
            except Interrupted:
                out.interrupted = True
                break
            info = dict(images.request.record(0), hires=spec.hires)
            if prompt != spec.prompt:                  # A1111 writes the prompt with its <lora:…> tags
                info["prompt"] = spec.prompt
            text = png_parameters(info, model.name, model_hash, pipe.loras)
            out.images.append(base64.b64encode(png_bytes(images[0], text)).decode())
            out.infotexts.append(text["parameters"])
            out.seeds.append(seed)
    return out


def png_bytes(image, text: dict[str, str]) -> bytes:
    """The PNG `ldm generate` would write, as bytes (written by the same `save_image`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        save_image(image, path, text)
        return path.read_bytes()
