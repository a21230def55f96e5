"""`ldm generate --prompts-file FILE -o DIR`: one image per prompt line (× -n), image j of the
run seeded --seed + j (default seed 0, so every process and every rerun agrees) and named
`{prompt index:05d}-{seed}.png`. Under `accelerate launch --num_processes N` the images are split
between the processes (`PartialState.split_between_processes`); each image depends only on its
seed, so any split draws the same images as one process. Images already on disk are skipped
(writes are atomic, so a file there is complete); the main process writes `metadata.jsonl`
(imagefolder: file_name, text, ...) for the whole list at the end."""
from __future__ import annotations

import json
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    index: int            # the prompt's line among the prompts
    prompt: str           # as written (with any <lora:…> tags)
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.index:05d}-{self.seed}.png"


def read_prompts(path: str | Path) -> list[str]:
    """The file's non-empty lines, stripped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file {path}: can't read it ({e})") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompts: write one prompt per line")
    return prompts


def plan(prompts: list[str], n: int, seed: int) -> list[Item]:
    """Every image of the run in order; image j gets seed + j."""
    return [Item(i, p, seed + i * n + k) for i, p in enumerate(prompts) for k in range(n)]


@contextmanager
def loras_loaded(pipe, loras: list[tuple[Path, float]], free_name):
    """The LoRAs merged for the block and taken out after it (the base weights back bit for bit);
    free_name(pipe, stem) names each as `ldm generate` does."""
    names = []
    try:
        for path, scale in loras:
            names.append(pipe.load_lora(path, scale, name=free_name(pipe, path.stem)))
        yield
    finally:
        for name in reversed(names):
            pipe.unload_lora(name)


def process_state(device: str):
    """Accelerate's view of this process. On CPUs `PartialState()` makes every process rank 0 of 1
    under ACCELERATE_USE_CPU=1 (checked with accelerate 1.15), so the CPU case asks for cpu=True."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or str(device).startswith("cpu"))


def run_batch(args, cli) -> int:
    """`ldm generate --prompts-file`: checks everything first (flags, prompts, LoRA tags, the
    output folder), then draws this process's share. `cli`: the ldm.cli module, whose checks and
    drawing this reuses (passed in by it rather than imported back, so imports stay one-way)."""
    from .outputs import IMAGE_FORMATS, model_hash, png_parameters, save_image
    cli.check_generate_args(args)
    if args.prompt is not None:
        raise ValueError("give a PROMPT or --prompts-file FILE, not both")
    out = Path(args.output)
    if out.suffix.lower() in IMAGE_FORMATS:
        raise ValueError(f"with --prompts-file, -o is a folder for the images, got the file name {out}")
    items = plan(read_prompts(args.prompts_file), args.n, 0 if args.seed is None else args.seed)
    loras = {p: cli.lora_requests(args, p) for p in dict.fromkeys(it.prompt for it in items)}
    image = cli.read_image(args.image, "--image") if args.image else None
    mask = cli.read_image(args.mask, "--mask", mode=None) if args.mask else None
    regions = [cli.parse_region(r) for r in args.region] if args.region else None if args.no_regions else "auto"
    out.mkdir(parents=True, exist_ok=True)
    state = process_state(args.device)
    with state.split_between_processes(items) as mine:
        todo = [it for it in mine if not (out / it.file_name).exists()]
    if todo:
        device = state.device if args.device == "cuda" and state.num_processes > 1 else args.device
        pipe, model = cli.load_pipeline(Namespace(**{**vars(args), "device": device}))
        hash_ = model_hash(model)
        syntax = args.prompt_syntax or ("plain" if pipe.config.text_encoder.kind == "t5" else "a1111")
        for it in todo:
            prompt, its_loras = loras[it.prompt]
            kw = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.scale,
                      guidance_rescale=args.guidance_rescale, seed=it.seed, sampler=args.sampler,
                      karras=args.karras, eta=args.eta, num_images_per_prompt=1, regions=regions,
                      prompt_syntax=syntax)
            with loras_loaded(pipe, its_loras, cli._free_name):
                images = cli._draw(Namespace(**{**vars(args), "prompt": prompt}), pipe, image, mask, kw)
                info = dict(images.request.record(0), hires=args.hires, prompt=it.prompt,
                            classifier_scale=args.classifier_scale)
                save_image(images[0], out / it.file_name, png_parameters(info, model.name, hash_, pipe.loras))
            print(out / it.file_name, flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        write_metadata(out, items)
    return 0


def write_metadata(out: Path, items: list[Item]) -> None:
    """metadata.jsonl for every image of the run, from the parameters in its PNG, atomically."""
    from PIL import Image

    from .formats.files import atomic_write
    lines = []
    for it in items:
        with Image.open(out / it.file_name) as im:
            text = im.text
        lines.append(json.dumps(dict(file_name=it.file_name, text=it.prompt, prompt_index=it.index, seed=it.seed,
                                     parameters=text["parameters"])))
    atomic_write(out / "metadata.jsonl", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
