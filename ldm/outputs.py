"""Where generated images go: file names, the A1111-style parameters written into them, atomic writes.
Shared by `ldm generate`, batch generation and the server, so every path writes the same files."""
from __future__ import annotations

import json
from pathlib import Path


def model_hash(path: Path) -> str:
    """sha256 of the weights, first 10 hex digits (the "Model hash" other SD tools print)."""
    from .formats.files import sha256_of
    files = [path] if path.is_file() else sorted(path.glob("unet/*.safetensors")) or sorted(path.rglob("*.safetensors"))
    return sha256_of(*files)[:10]


def png_parameters(info: dict, model_name: str, hash_: str, loras: dict | None = None) -> dict[str, str]:
    """PNG text chunks: `parameters` in the A1111 layout, plus one chunk per field. `loras`: the
    pipeline's `loras` (name -> (path, scale, hash)), as A1111's `Lora hashes` and a `loras` chunk."""
    lines = [info["prompt"]]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    lines.append(f"Steps: {info['steps']}, Sampler: {info['sampler']}, CFG scale: {info['guidance_scale']}, "
                 f"Seed: {info['seed']}, Size: {info['width']}x{info['height']}, Model hash: {hash_}, "
                 f"Model: {model_name}, Batch index: {info['batch_index']}")
    if info.get("guidance_rescale"):  # only when used, so plain images keep the usual layout
        lines[-1] += f", CFG rescale: {info['guidance_rescale']}"
    if info.get("regions"):
        lines[-1] += f", Regions: {len(info['regions'])}"
    if info.get("strength") is not None:       # A1111's img2img / inpainting / hires fields
        lines[-1] += f", Denoising strength: {info['strength']}, Steps run: {info['steps_run']}"
    if info.get("hires"):
        lines[-1] += f", Hires upscale: {info['hires']}, Hires upscaler: Lanczos"
    if info.get("noise_level") is not None:
        lines[-1] += f", Noise level: {info['noise_level']}"
    if info.get("classifier_scale"):
        lines[-1] += f", Classifier scale: {info['classifier_scale']}"
    if info.get("prior_steps") is not None:      # text -> prior -> image embedding (the DALL·E 2 family)
        lines[-1] += f", Prior steps: {info['prior_steps']}, Prior scale: {info['prior_guidance_scale']}"
    if info.get("prompt_syntax") == "plain":      # A1111's own output implies its syntax
        lines[-1] += ", Prompt syntax: plain"
    if loras:
        clean = lambda n: n.replace(":", "").replace(",", "")      # noqa: E731  as A1111 writes names
        lines[-1] += ', Lora hashes: "' + ", ".join(f"{clean(n)}: {h}" for n, (_, _, h) in loras.items()) + '"'
    fields = {k: str(info[k]) for k in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale",
                                        "sampler", "height", "width", "batch_index")}
    fields["guidance_rescale"] = str(info.get("guidance_rescale", 0.0))
    fields["regions"] = json.dumps(info.get("regions", []))
    for key in ("strength", "steps_run", "noise_level", "hires", "prompt_syntax", "classifier_scale", "prior_steps",
                "prior_guidance_scale"):
        if info.get(key) is not None:
            fields[key] = str(info[key])
    if loras:
        fields["loras"] = json.dumps([dict(name=n, path=p, scale=w, hash=h) for n, (p, w, h) in loras.items()])
    return {"parameters": "\n".join(lines), **fields, "model": model_name, "model_hash": hash_}


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(image, path: Path, text: dict[str, str]) -> None:
    """Write by the file's extension, atomically: PNG with one text chunk per field; JPEG and WebP
    with `parameters` in the EXIF UserComment, where A1111 puts it."""
    from .formats.files import atomic_write
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo
        meta = PngInfo()
        for k, v in text.items():
            meta.add_itxt(k, v)
        kwargs = dict(pnginfo=meta)
    else:
        from PIL import Image
        exif = Image.Exif()
        exif[0x9286] = b"UNICODE\0" + text["parameters"].encode("utf-16-be")   # EXIF UserComment
        kwargs = dict(exif=exif.tobytes(), quality=95)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i:02d}{out.suffix}") for i in range(n)]


def check_outputs(paths: list[Path]) -> None:
    """Refuse outputs that can't be written before any work: an unknown extension, a folder, a
    folder that can't be created or written."""
    import tempfile
    for path in paths:
        if path.suffix.lower() not in IMAGE_FORMATS:
            raise ValueError(f"-o {path}: write .png, .jpg or .webp (the format follows the extension)")
        if path.is_dir():
            raise ValueError(f"-o {path} is a folder: give a file name, e.g. {path / 'out.png'}")
    for parent in dict.fromkeys(p.parent for p in paths):
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            raise ValueError(f"can't write images into {parent}: {e.strerror or e}") from e
