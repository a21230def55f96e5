"""The `ldm` command: generate, convert, eval. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import importlib
import math
import random
import re
import sys
from pathlib import Path

from .outputs import check_outputs, model_hash, output_paths, png_parameters, save_image
from .precision import NAMES as DTYPE_NAMES

RUN_DTYPES = sorted(DTYPE_NAMES) + ["auto"]      # auto: ldm/precision.py picks what this device computes natively


def check_generate_args(args) -> None:
    """The flags the library checks too, with its checks, before the model is loaded."""
    from .checks import as_float, as_int, check_device
    from .guidance import check_guidance_rescale
    from .samplers import check_options
    if args.steps is not None:
        as_int(args.steps, "--steps", 1)
    if args.scale is not None:
        as_float(args.scale, "--scale", 0, hint=" (1 = no guidance)")
    check_guidance_rescale(args.guidance_rescale)
    for name in ("height", "width"):
        if getattr(args, name, None) is not None:
            as_int(getattr(args, name), f"--{name}", 1)
    if args.seed is not None:
        as_int(args.seed, "--seed", 0, 2 ** 64 - 1)
    as_int(args.n, "-n", 1)
    as_int(args.batch_size, "--batch-size", 1)
    if args.sampler is not None:
        check_options(args.sampler, args.eta, args.karras)
    check_device(args.device)
    if getattr(args, "region", None) and args.no_regions:
        raise ValueError("--region and --no-regions contradict each other: give one")
    if getattr(args, "strength", None) is not None:
        as_float(args.strength, "--strength", 1e-9, 1.0, hint=" (the share of the steps run from the image)")
    if getattr(args, "mask", None) and not args.image:
        raise ValueError("--mask needs --image (the picture to inpaint)")
    if getattr(args, "hires", None) is not None:
        as_float(args.hires, "--hires", 1.0, 8.0, hint=" (the factor the first pass is upscaled by)")
        if args.image:
            raise ValueError("--hires is for text-to-image; with --image, pass the size you want instead")
    if getattr(args, "variations", None) is not None:
        as_int(args.variations, "--variations", 1)
        if not args.image or args.mask or args.n != 1:
            raise ValueError("--variations N draws N variations of --image (no --mask, no -n)")
        args.n = args.variations
    if getattr(args, "classifier_scale", None) is not None:
        as_float(args.classifier_scale, "--classifier-scale", 0, hint=" (0 = no classifier guidance)")
    if getattr(args, "classifier", None) and not getattr(args, "classifier_scale", None):
        raise ValueError("--classifier guides only with --classifier-scale S > 0")
    if getattr(args, "prior", None) is not None and (args.image or args.hires is not None):
        raise ValueError("--prior draws the image embedding from the PROMPT: no --image (that is --variations), "
                         "no --hires")
    if getattr(args, "prior", None) and not Path(args.prior).is_file():
        raise ValueError(f"--prior {args.prior}: no such file (train one with python train_unclip.py --set part=prior)")
    if getattr(args, "prior", None) is None and (getattr(args, "prior_steps", None) is not None
                                                 or getattr(args, "prior_scale", None) is not None):
        raise ValueError("--prior-steps / --prior-scale set the prior of --prior: add --prior")
    if getattr(args, "prior_steps", None) is not None:
        as_int(args.prior_steps, "--prior-steps", 1)
    if getattr(args, "prior_scale", None) is not None:
        as_float(args.prior_scale, "--prior-scale", 0, hint=" (1 = no guidance)")


def load_pipeline(args):
    """(pipeline, model path) for a drawing command: --model, or the default model (which draws
    variations too), with the noisy classifier attached for --classifier-scale and the prior for --prior."""
    from .pipeline import DEFAULT_CLASSIFIER, Pipeline, default_model_path
    model = Path(args.model) if args.model else default_model_path()
    classifier = None
    if getattr(args, "classifier_scale", None):
        classifier = Path(args.classifier) if args.classifier else DEFAULT_CLASSIFIER
        if not args.classifier and args.model:
            raise ValueError("--classifier-scale with --model needs --classifier PATH (a noisy classifier "
                             "trained for that model's latents: train_classifier.py)")
        if not classifier.is_file():
            raise ValueError(f"--classifier {classifier}: no such file (train one with train_classifier.py)")
    pipe = Pipeline.from_pretrained(model, device=args.device, dtype=args.dtype,
                                    prediction_type=args.prediction_type, allow_pickle=args.allow_pickle,
                                    config=args.config)
    kind = pipe.config.image_embedding
    if getattr(args, "variations", None) is not None and kind is None:
        raise ValueError(f"--variations: {model} has no image encoder, it draws no variations; pass --model with "
                         f"an image-variation / unCLIP model (the default model draws them)")
    if getattr(args, "variations", None) is not None and kind == "context" and args.prompt:
        raise ValueError("--variations: this image-variation model draws from the image alone; leave the PROMPT out")
    if classifier is not None:
        from .shapes.noisy_classifier import attach
        attach(pipe, classifier)
    if getattr(args, "prior", None) is not None:
        attach_prior(pipe, args.prior, bool(args.model))
    return pipe, model


def attach_prior(pipe, path: str, other_model: bool) -> None:
    """--prior [PATH]: a Stable unCLIP model's own prior (no PATH), or a prior file for a text model
    that draws variations (no PATH: the default model's, beside it in weights/)."""
    if pipe.config.prior is not None:
        if path:
            raise ValueError("--prior PATH: this Stable unCLIP model has its own prior; give --prior alone")
        return
    from .pipeline import DEFAULT_PRIOR
    from .prior import attach, check_takes_a_prior
    check_takes_a_prior(pipe.config)
    if not path and other_model:
        raise ValueError("--prior with --model needs a PATH (a prior trained for that model: "
                         "python train_unclip.py --set part=prior --set model=...)")
    attach(pipe, Path(path) if path else DEFAULT_PRIOR)


def read_image(path: str, what: str, mode: str | None = "RGB"):
    """An image file, read fully now (before the model loads); RGB unless mode is None."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode else im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{what} {path}: can't read it as an image ({e})") from e


def parse_region(text: str):
    """`PROMPT@LEFT,TOP,RIGHT,BOTTOM` (fractions of the image) -> Region; ValueError that says how."""
    from .regions import Region
    prompt, sep, box = text.rpartition("@")
    try:
        numbers = tuple(float(v) for v in box.split(","))
    except ValueError:
        numbers = ()
    if not sep or len(numbers) != 4:
        raise ValueError(f"--region {text!r}: write PROMPT@LEFT,TOP,RIGHT,BOTTOM with fractions of the "
                         f"image, e.g. 'a red circle@0,0,0.5,1' for the left half")
    return Region(prompt.strip(), numbers)


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def lora_requests(args, prompt: str | None) -> tuple[str | None, list[tuple[Path, float]]]:
    """(the prompt without its `<lora:NAME:w>` tags, [(file, scale)]) from --lora PATH[:SCALE] and
    the prompt's tags (NAME.safetensors in --lora-dir, as A1111), each file read and checked now,
    before the model loads."""
    from .lora import read
    wanted = []
    for spec in getattr(args, "lora", None) or []:
        path, sep, scale = spec.rpartition(":")
        if not sep or not scale or "/" in scale or scale.endswith(".safetensors"):
            path, scale = spec, "1.0"
        wanted.append((Path(path), scale, f"--lora {spec}"))
    if prompt is not None:
        for name, scale in LORA_TAG.findall(prompt):
            tag = f"<lora:{name}{':' + scale if scale else ''}>"
            if not getattr(args, "lora_dir", None):
                raise ValueError(f"the prompt's {tag} names a LoRA: pass --lora-dir DIR (the folder "
                                 f"holding {name}.safetensors), or give the file with --lora PATH:SCALE")
            wanted.append((Path(args.lora_dir) / f"{name}.safetensors", scale or "1.0", tag))
        prompt = LORA_TAG.sub("", prompt)
    out = []
    for path, scale, what in wanted:
        try:
            value = float(scale)
        except ValueError:
            raise ValueError(f"{what}: the scale must be a number, got {scale!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{what}: the scale must be a finite number (e.g. 0.8), got {scale!r}")
        if not path.is_file():
            raise ValueError(f"{what}: no LoRA file at {path}")
        read(path)                                      # unreadable / other formats: refused now
        out.append((path, value))
    return prompt, out


def cmd_generate(args) -> int:
    """`ldm generate`, `ldm upscale` and `ldm outpaint`: one loop over batches of -n, each command
    only choosing what one batch calls (`_draw`)."""
    from tqdm import tqdm

    if getattr(args, "prompts_file", None):
        from .batch import run_batch
        return run_batch(args, sys.modules[__name__])     # batch.py reuses this module's checks
    if args.prompt is None and not getattr(args, "image", None):   # image variations need no prompt
        raise ValueError("give a PROMPT (or --prompts-file FILE with one prompt per line; or, for an "
                         "image-variation model, --image)")
    check_generate_args(args)
    paths = output_paths(Path(args.output), args.n)
    check_outputs(paths)
    image = read_image(args.image, "--image" if args.command == "generate" else "input") if args.image else None
    mask = read_image(args.mask, "--mask", mode=None) if getattr(args, "mask", None) else None
    regions = [parse_region(r) for r in args.region] if args.region else None if args.no_regions else "auto"
    written_prompt = args.prompt
    args.prompt, loras = lora_requests(args, args.prompt)
    pipe, model = load_pipeline(args)
    for path, scale in loras:
        pipe.load_lora(path, scale, name=_free_name(pipe, path.stem))
    if args.compile:
        pipe.compile()
    hash_ = model_hash(model)
    syntax = args.prompt_syntax or ("plain" if getattr(pipe.config.text_encoder, "kind", None) == "t5" else "a1111")
    # -n in batches of --batch-size, batch k seeded seed + k: memory stays that of one batch, and
    # every image is on disk as soon as its batch is done
    seed = random.randrange(2 ** 32) if args.seed is None else args.seed
    batches = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    with tqdm(desc="sampling", unit="step", disable=args.quiet) as bar:
        for k, batch in enumerate(batches):
            kw = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.scale,
                      guidance_rescale=args.guidance_rescale, seed=seed + k, sampler=args.sampler,
                      karras=args.karras, eta=args.eta, num_images_per_prompt=len(batch), regions=regions,
                      prompt_syntax=syntax, callback=lambda d: bar.update(1))
            images = _draw(args, pipe, image, mask, kw)
            for i, (im, path) in enumerate(zip(images, batch)):
                info = dict(images.request.record(i), hires=getattr(args, "hires", None),
                            classifier_scale=getattr(args, "classifier_scale", None))
                if written_prompt != args.prompt:      # A1111 writes the prompt with its <lora:…> tags
                    info["prompt"] = written_prompt
                save_image(im, path, png_parameters(info, model.name, hash_, pipe.loras))
                print(path)
    return 0


def _free_name(pipe, stem: str) -> str:
    """`stem`, or `stem-2`, ... when a LoRA of that name is loaded already."""
    name, k = stem, 1
    while name in pipe.loras:
        k += 1
        name = f"{stem}-{k}"
    return name


def _draw(args, pipe, image, mask, kw):
    """One batch of the command's images."""
    from .recipes import hires, outpaint
    if args.command == "upscale":
        return pipe(args.prompt, image=image, noise_level=args.noise_level, **kw)
    if args.command == "outpaint":
        return outpaint(pipe, args.prompt, image, left=args.left, right=args.right, top=args.top,
                        bottom=args.bottom, strength=args.strength, **kw)
    kw.update(height=args.height, width=args.width)
    if getattr(args, "classifier_scale", None):       # the server's jobs don't carry it
        kw.update(classifier_scale=args.classifier_scale)
    if getattr(args, "prior", None) is not None:
        kw.update(use_prior=True, prior_steps=args.prior_steps,
                  prior_guidance_scale=args.prior_scale)
    if args.hires is not None:
        return hires(pipe, args.prompt, scale=args.hires, strength=args.hires_strength, **kw)
    return pipe(args.prompt, image=image, mask_image=mask, strength=args.strength, **kw)


def cmd_convert(args) -> int:
    from .pipeline import Pipeline
    pipe = Pipeline.from_pretrained(args.src, prediction_type=args.prediction_type, config=args.config,
                                    use_ema=args.use_ema, allow_pickle=args.allow_pickle)
    if args.set:
        from .settings import set_settings
        pipe.model.config = set_settings(pipe.config, args.set)
    pipe.save_pretrained(args.dst, args.to, dtype=DTYPE_NAMES[args.dtype] if args.dtype else None)
    print(args.dst)
    return 0


# Commands that live in their own module (one job each); their imports stay light until run.
COMMAND_MODULES = ("ldm.shapes.eval_cli", "ldm.metrics.cli", "ldm.server.cli", "ldm.interpolate_cli")

CONFIG_HELP = ("the model's config: an ldm .yaml/.json config file or a diffusers folder of the model "
               "(for an original file that is not SD1/SD2, whose shapes don't tell its attention heads)")


CORE_COMMANDS = ("generate", "upscale", "outpaint", "convert")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All commands; `command`, when it is a core one, skips importing COMMAND_MODULES (start-up time)."""
    from .samplers import SAMPLERS
    p = argparse.ArgumentParser(prog="ldm", description="Latent text-to-image diffusion (Stable Diffusion family).")
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)        # what every drawing command takes
    common.add_argument("-o", "--output", default="out.png",
                        help="output .png, .jpg or .webp, with the parameters in it (numbered when -n > 1)")
    common.add_argument("--model", help="our .safetensors, an original SD .safetensors or a diffusers folder "
                                        "(default: the model shipped in weights/)")
    common.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    common.add_argument("--scale", type=float, help="classifier-free guidance scale (default: the model's)")
    common.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="CFG rescale φ in [0, 1] against overexposure at high --scale (0 = off, 0.7 typical)")
    common.add_argument("--seed", type=int, help="random seed (default: random, written to the PNG)")
    common.add_argument("--negative", help="negative prompt (replaces the empty prompt as the null condition)")
    common.add_argument("--prompt-syntax", choices=("a1111", "plain"), default=None,
                        help="a1111 (default): A1111's (word:1.3) weights, BREAK and prompts past 75 tokens; "
                             "plain: diffusers' (truncated at 77 tokens). T5 models: plain")
    common.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the model's)")
    common.add_argument("--karras", action=argparse.BooleanOptionalAction,
                        help="Karras sigmas: --sampler dpmpp_2m --karras is dpmpp_2m_karras (euler, "
                             "euler_ancestral, dpmpp_2m; default: the model's scheduler)")
    common.add_argument("--eta", type=float, default=0.0, help="DDIM η in [0, 1] (0 = deterministic)")
    common.add_argument("-n", type=int, default=1, help="number of images")
    common.add_argument("--batch-size", type=int, default=8,
                        help="images drawn at once (default 8); batch k of -n is seeded --seed + k")
    common.add_argument("--device", default="cpu")
    common.add_argument("--dtype", default="float32", choices=RUN_DTYPES,
                        help="float32 (default: diffusers' pictures bit for bit); bf16/fp16: faster where the "
                             "device computes them natively (warns where it would emulate); auto: bf16 on a "
                             "CPU with AVX512-BF16/AMX, fp16 on a GPU, else float32")
    common.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (a one-off compile, then faster steps: bench/README.md)")
    common.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                        help="override for original SD2.x-768 files (v_prediction), which shapes can't tell")
    common.add_argument("--allow-pickle", action="store_true", help="allow .ckpt files (read with weights_only=True)")
    common.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    common.add_argument("--region", action="append", default=[], metavar="PROMPT@L,T,R,B",
                        help="draw PROMPT in this box (fractions of the image) while the layout forms; "
                             "repeatable; replaces the model's own layout plan")
    common.add_argument("--no-regions", action="store_true",
                        help="don't plan regions with the model's layout planner (the prompt alone)")
    common.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors) at SCALE "
                             "(default 1.0); repeatable")
    common.add_argument("--lora-dir", metavar="DIR",
                        help="where the prompt's <lora:NAME:SCALE> tags find NAME.safetensors (A1111's syntax)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", parents=[common], help="draw images from a prompt (or an image and a prompt)",
                       description="Draw images from a prompt; PNGs carry the generation parameters. "
                                   "--image: img2img; --image with --mask: inpainting.")
    g.add_argument("prompt", nargs="?")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="one prompt per line, -o a folder: image j seeded --seed + j (default 0), named "
                        "INDEX-SEED.png, resumable, split between `accelerate launch` processes (ldm/batch.py)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--image", metavar="PATH", help="img2img from this picture (the output takes its size)")
    g.add_argument("--mask", metavar="PATH", help="with --image: inpaint where the mask is white")
    g.add_argument("--strength", type=float,
                   help="with --image: share of the steps run from the noised picture (default 0.8; 1.0 inpainting)")
    g.add_argument("--hires", type=float, metavar="K",
                   help="hires fix: draw, upscale the pixels ×K, img2img at that size (A1111's)")
    g.add_argument("--hires-strength", type=float, default=0.5, help="the hires pass's strength (default 0.5)")
    g.add_argument("--variations", type=int, metavar="N",
                   help="N variations of --image (no prompt needed) by an image-variation / unCLIP --model "
                        "(the default model draws them too)")
    g.add_argument("--classifier-scale", type=float, metavar="S",
                   help="classifier guidance by a noisy classifier toward what the prompt names (default "
                        "model: weights/ldm-default-classifier.safetensors; train_classifier.py)")
    g.add_argument("--classifier", metavar="PATH", help="the noisy classifier for --classifier-scale")
    g.add_argument("--prior", nargs="?", const="", metavar="PATH",
                   help="DALL·E 2's text -> prior -> image embedding -> image (default model: "
                        "weights/ldm-default-prior.safetensors; a Stable unCLIP --model: its own prior)")
    g.add_argument("--prior-steps", type=int, metavar="N", help="with --prior: the prior's DDPM steps (default 25)")
    g.add_argument("--prior-scale", type=float, metavar="S", help="with --prior: the prior's CFG scale (default 4.0)")
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("upscale", parents=[common], help="×4 an image with an upscaler model (SD x4)",
                       description="Upscale with an upscaler model (--model: stabilityai/stable-diffusion-"
                                   "x4-upscaler as a diffusers folder or original file).")
    u.add_argument("image", metavar="INPUT")
    u.add_argument("--prompt", default="", help="what the picture shows (guides the detail)")
    u.add_argument("--noise-level", type=int, default=20,
                   help="how much the low-res picture is noised first (0 to the model's max, 350 for SD x4)")
    u.set_defaults(func=cmd_generate)

    o = sub.add_parser("outpaint", parents=[common], help="extend a picture beyond its borders",
                       description="Pad the picture by the given pixels and draw the new border for PROMPT.")
    o.add_argument("image", metavar="INPUT")
    o.add_argument("prompt")
    for side in ("left", "right", "top", "bottom"):
        o.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    o.add_argument("--strength", type=float, default=1.0, help="1.0 (default) draws the border from noise")
    o.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert between checkpoint formats")
    c.add_argument("src", help="our .safetensors, an original SD .safetensors/.ckpt or a diffusers folder")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=["ldm", "original", "diffusers"])
    c.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="store weights in this dtype")
    c.add_argument("--prediction-type", choices=["epsilon", "v_prediction"])
    c.add_argument("--use-ema", action="store_true", help="take the UNet from the EMA weights")
    c.add_argument("--allow-pickle", action="store_true")
    c.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a sampling setting stored with the model (default_steps, "
                        "default_guidance_scale, default_sampler, layout_planner, ...); repeatable")
    c.set_defaults(func=cmd_convert)

    for module in () if command in CORE_COMMANDS else COMMAND_MODULES:  # NAME, HELP, add_arguments, run
        try:
            mod = importlib.import_module(module)
        except ImportError as e:           # an optional part not installed (ldm/shapes)
            if e.name and module.startswith(e.name):
                continue
            raise
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:   # FileNotFoundError is an OSError
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
